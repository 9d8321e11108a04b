"""Shape arithmetic of the valid-convolution U-Net (no torch).

A U-Net of depth ``d`` (number of 2x2 poolings) with ``n`` unpadded 3x3(x3) convolutions per
level maps an input of size ``s + 2m`` to an output of size ``s`` along every spatial axis,
where the margin (context voxels per side) is ``m = n * (3 * 2**d - 2)``. Ronneberger et al.
(2015), "U-Net: Convolutional Networks for Biomedical Image Segmentation": depth 4, two
convolutions per level gives ``m = 92`` and 572 -> 388.

A size is *valid* when every 2x2 pooling sees an even size and no feature map shrinks to zero.
Valid output sizes are exactly ``2n + k * 2**d`` above a small minimum, so all valid outputs
(and all valid inputs) of one network are congruent modulo ``2**d``: this is what makes tiles
with origins on the ``2**d`` lattice reproduce the whole-volume forward pass, mirrored or not.
All sizes are in voxels along one axis.
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_SEARCH = 1 << 16


def _check(depth: int, convs_per_level: int) -> None:
    if depth < 0 or convs_per_level < 1:
        raise ValueError(
            f"depth must be >= 0 and convs_per_level >= 1, got {depth}, {convs_per_level}"
        )


def lattice(depth: int) -> int:
    """Tile origins must be multiples of this (``2**depth`` voxels) to keep pooling aligned."""
    return 1 << depth


def margin(depth: int, convs_per_level: int = 2) -> int:
    """Context voxels consumed per side: ``output = input - 2 * margin``."""
    _check(depth, convs_per_level)
    return convs_per_level * (3 * (1 << depth) - 2)


@dataclass(frozen=True)
class LevelSizes:
    """Feature-map sizes along one axis: encoder (after the convs of each level, before
    pooling), bottom (after its convs) and decoder (after the convs of each level, deepest
    first). ``decoder[-1]`` is the network output."""

    encoder: tuple[int, ...]
    bottom: int
    decoder: tuple[int, ...]


def trace(input_size: int, depth: int, convs_per_level: int = 2) -> LevelSizes:
    """Sizes of every feature map for ``input_size``; ``ValueError`` if the size is invalid."""
    _check(depth, convs_per_level)
    shrink = 2 * convs_per_level
    s = int(input_size)
    enc: list[int] = []
    for level in range(depth):
        s -= shrink
        if s < 2 or s % 2:
            raise ValueError(
                f"input size {input_size} is invalid: level {level} feature map has size {s}, "
                "which 2x2 pooling cannot halve"
            )
        enc.append(s)
        s //= 2
    s -= shrink
    if s < 1:
        raise ValueError(f"input size {input_size} is too small: the bottom feature map is empty")
    bottom = s
    dec: list[int] = []
    for level in reversed(range(depth)):
        s = 2 * s - shrink
        if s < 1:
            raise ValueError(
                f"input size {input_size} is too small: decoder level {level} is empty"
            )
        dec.append(s)
    return LevelSizes(tuple(enc), bottom, tuple(dec))


def is_valid_input(input_size: int, depth: int, convs_per_level: int = 2) -> bool:
    try:
        trace(input_size, depth, convs_per_level)
    except ValueError:
        return False
    return True


def output_size(input_size: int, depth: int, convs_per_level: int = 2) -> int:
    """Output size for an input size; ``ValueError`` for invalid input sizes."""
    sizes = trace(input_size, depth, convs_per_level)
    return sizes.decoder[-1] if sizes.decoder else sizes.bottom


def input_size(output_size: int, depth: int, convs_per_level: int = 2) -> int:
    """Input size that yields ``output_size``; ``ValueError`` if no input does."""
    s = int(output_size) + 2 * margin(depth, convs_per_level)
    if not is_valid_input(s, depth, convs_per_level):
        raise ValueError(
            f"output size {output_size} is not reachable (depth {depth}, "
            f"{convs_per_level} convs per level); use valid_output_size()"
        )
    return s


def is_valid_output(n: int, depth: int, convs_per_level: int = 2) -> bool:
    return n >= 1 and is_valid_input(n + 2 * margin(depth, convs_per_level), depth, convs_per_level)


def min_output_size(depth: int, convs_per_level: int = 2) -> int:
    """Smallest valid output size."""
    return valid_output_size(1, depth, convs_per_level, mode="ge")


def valid_output_size(n: int, depth: int, convs_per_level: int = 2, mode: str = "ge") -> int:
    """Nearest valid output size ``>= n`` (``mode="ge"``) or ``<= n`` (``mode="le"``).

    ``ValueError`` when ``mode="le"`` and ``n`` is below the smallest valid output size.
    """
    if mode not in ("ge", "le"):
        raise ValueError(f"mode must be 'ge' or 'le', got {mode!r}")
    step = 1 if mode == "ge" else -1
    s = max(int(n), 1) if mode == "ge" else int(n)
    for _ in range(_MAX_SEARCH):
        if s < 1:
            break
        if is_valid_output(s, depth, convs_per_level):
            return s
        s += step
    raise ValueError(
        f"no valid output size {'>=' if mode == 'ge' else '<='} {n} "
        f"(depth {depth}, {convs_per_level} convs per level)"
    )


def valid_input_size(n: int, depth: int, convs_per_level: int = 2, mode: str = "ge") -> int:
    """Nearest valid input size ``>= n`` or ``<= n`` (see :func:`valid_output_size`)."""
    m2 = 2 * margin(depth, convs_per_level)
    return valid_output_size(int(n) - m2, depth, convs_per_level, mode) + m2


@dataclass(frozen=True)
class SkipCrop:
    """The part of an encoder level's feature map that the decoder reads: the centre box
    ``[offset, offset + size)`` per spatial axis (voxels), ``size`` being the decoder's
    upsampled map at that level."""

    offset: tuple[int, ...]
    size: tuple[int, ...]


def skip_crops(
    input_shape: tuple[int, ...], depth: int, convs_per_level: int = 2
) -> list[SkipCrop]:
    """The centre crop of every skip, top level (0) first, for a spatial ``input_shape``.

    Known before the forward pass, so the lean inference forward
    (:meth:`medseg.model.unet.UNet.forward_lean`) keeps only these boxes of the encoder maps.
    ``ValueError`` if the input shape is invalid.
    """
    traces = [trace(int(s), depth, convs_per_level) for s in input_shape]
    crops = []
    for level in range(depth):
        offset, size = [], []
        for t in traces:
            below = t.bottom if level == depth - 1 else t.decoder[depth - 2 - level]
            offset.append((t.encoder[level] - 2 * below) // 2)
            size.append(2 * below)
        crops.append(SkipCrop(tuple(offset), tuple(size)))
    return crops


#: Block-output columns (last spatial axis) per slab in the lean inference forward. Slabs of
#: 16 hold under a tenth of a 3D tile's top-level map at the usual 188..284 voxel inputs,
#: while recomputing the 2 * (convs_per_level - 1) halo columns of the first convolutions
#: costs about 1/16 of those convolutions.
LEAN_SLAB_ROWS = 16


def slab_bounds(rows: int, slab_rows: int = LEAN_SLAB_ROWS) -> list[tuple[int, int]]:
    """``[r0, r1)`` ranges covering ``range(rows)`` (block-output voxels along the slab axis)
    in as few balanced slabs of at most ``slab_rows`` (rounded down to even, at least 2) as
    possible; bounds are even so that 2x2 pooling applies to each slab alone (``rows``, an
    encoder map size, is even)."""
    rows = int(rows)
    cap = max(2, int(slab_rows) // 2 * 2)
    if rows <= cap:
        return [(0, rows)]
    count = -(-rows // cap)
    step = 2 * -(-rows // (2 * count))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def channel_widths(depth: int, base_channels: int, channel_multiplier: int = 2) -> list[int]:
    """Feature channels at each level, top (0) to bottom (``depth``)."""
    return [int(base_channels) * int(channel_multiplier) ** level for level in range(depth + 1)]


def peak_activation_elements(
    output_shape: tuple[int, ...],
    *,
    depth: int,
    in_channels: int,
    out_channels: int,
    base_channels: int,
    channel_multiplier: int = 2,
    convs_per_level: int = 2,
    channel_block: int = 1,
    **_: object,
) -> int:
    """Largest number of float activations alive at once in one inference forward pass.

    ``output_shape`` is the (valid) output size per spatial axis. The estimate walks the
    layers in order and, at each one, counts its input and output plus the skip tensors kept
    for the decoder; per-voxel work buffers of the convolution backend are not counted, so
    callers add a safety factor. Extra keyword arguments (the rest of ``plan.network``) are
    ignored so that ``peak_activation_elements(shape, **plan.network)`` works.
    ``channel_block`` rounds every channel count up to a multiple of it: oneDNN (PyTorch's CPU
    convolution backend) stores activations in blocked layouts padded to 8 or 16 channels.

    This is the plain forward (:meth:`medseg.model.unet.UNet.forward`: whole encoder maps
    kept as skips); the lean inference forward has :func:`lean_peak_activation_elements`.
    """
    m = margin(depth, convs_per_level)
    traces = [trace(s + 2 * m, depth, convs_per_level) for s in output_shape]

    def rc(c: int) -> int:
        return _round_channels(c, channel_block)

    widths = [rc(w) for w in channel_widths(depth, base_channels, channel_multiplier)]
    in_channels, out_channels = rc(in_channels), rc(out_channels)
    vox = _vox

    cur = vox([s + 2 * m for s in output_shape]) * in_channels
    peak = 0
    skips = 0
    sizes = [s + 2 * m for s in output_shape]
    # contracting path
    for level in range(depth + 1):
        for _c in range(convs_per_level):
            sizes = [s - 2 for s in sizes]
            new = vox(sizes) * widths[level]
            peak = max(peak, skips + cur + new)
            cur = new
        if level < depth:
            assert sizes == [t.encoder[level] for t in traces]
            skips += cur
            sizes = [s // 2 for s in sizes]
            new = vox(sizes) * widths[level]
            peak = max(peak, skips + new)
            cur = new
    # expanding path: upsample, crop skip, concatenate, convs
    for level in reversed(range(depth)):
        sizes = [2 * s for s in sizes]
        up = vox(sizes) * widths[level]
        peak = max(peak, skips + cur + up)
        cat = vox(sizes) * 2 * widths[level]
        peak = max(peak, skips + up + cat)
        skips -= vox([t.encoder[level] for t in traces]) * widths[level]
        cur = cat
        for _c in range(convs_per_level):
            sizes = [s - 2 for s in sizes]
            new = vox(sizes) * widths[level]
            peak = max(peak, skips + cur + new)
            cur = new
    peak = max(peak, cur + vox(sizes) * out_channels)
    return int(peak)


def _round_channels(c: int, block: int) -> int:
    return -(-int(c) // block) * block


def _vox(sizes: list[int] | tuple[int, ...]) -> int:
    v = 1
    for s in sizes:
        v *= int(s)
    return v


def lean_peak_activation_elements(
    output_shape: tuple[int, ...],
    *,
    depth: int,
    in_channels: int,
    out_channels: int,
    base_channels: int,
    channel_multiplier: int = 2,
    convs_per_level: int = 2,
    channel_block: int = 1,
    slab_rows: int = LEAN_SLAB_ROWS,
    **_: object,
) -> int:
    """Largest number of float activations alive at once in the lean inference forward
    (:meth:`medseg.model.unet.UNet.forward_lean`), same conventions as
    :func:`peak_activation_elements`.

    Each encoder block runs slab by slab along the last axis (:func:`slab_bounds`): alive are
    the tile input (the caller holds it for the whole pass), the level's input, the pooled
    map and the cropped skip being filled, the skips of the levels above (centre crops only,
    :func:`skip_crops`), and one slab's input copy, convolution outputs and pooled rows.
    The bottom and the decoder work on whole (small) maps as in the plain forward.
    """
    m = margin(depth, convs_per_level)
    n = convs_per_level
    sizes = [int(s) + 2 * m for s in output_shape]
    crops = skip_crops(tuple(sizes), depth, n)
    widths = [
        _round_channels(w, channel_block)
        for w in channel_widths(depth, base_channels, channel_multiplier)
    ]
    c_in = _round_channels(in_channels, channel_block)
    inp = _vox(sizes) * c_in
    peak = inp
    skips = 0
    level_in = 0  # the level's input when it is not the tile input
    for level in range(depth):
        w = widths[level]
        enc = [s - 2 * n for s in sizes]
        bounds = slab_bounds(enc[-1], slab_rows)
        rows = max(b - a for a, b in bounds)
        crop = _vox(crops[level].size) * w
        pooled = _vox([e // 2 for e in enc]) * w
        held = inp + level_in + skips + crop + pooled
        r, other = rows + 2 * n, sizes[:-1]
        # a slab is a view of the level input; convolution copies it when not contiguous
        prev = r * _vox(other) * c_in if len(bounds) > 1 else 0
        for _c in range(n):
            r, other = r - 2, [s - 2 for s in other]
            new = r * _vox(other) * w
            peak = max(peak, held + prev + new)
            prev = new
        peak = max(peak, held + prev + (rows // 2) * _vox([s // 2 for s in other]) * w)
        skips += crop
        level_in = pooled
        sizes = [e // 2 for e in enc]
        c_in = w
    prev = level_in
    for _c in range(n):
        sizes = [s - 2 for s in sizes]
        new = _vox(sizes) * widths[depth]
        peak = max(peak, inp + skips + prev + new)
        prev = new
    cur = prev
    for level in reversed(range(depth)):
        w = widths[level]
        sizes = [2 * s for s in sizes]
        up = _vox(sizes) * w
        peak = max(peak, inp + skips + cur + up + 2 * up)  # upsampled, concatenated
        skips -= _vox(crops[level].size) * w
        cur = 2 * up
        for _c in range(n):
            sizes = [s - 2 for s in sizes]
            new = _vox(sizes) * w
            peak = max(peak, inp + skips + cur + new)
            cur = new
    peak = max(peak, inp + cur + _vox(sizes) * _round_channels(out_channels, channel_block))
    return int(peak)
