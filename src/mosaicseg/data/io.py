"""Read and write medical images with their geometry, behind one function pair.

Arrays are channel-first and spatially in ``(X, Y[, Z])`` order (ITK index order, so ``spacing[i]``
belongs to axis ``i``). 3D images are reoriented to one canonical orientation (``LPS``: direction as
close to identity as axis permutations and flips allow) for training; :func:`write_image` restores the
file's own orientation, spacing, origin and direction exactly. A NIfTI with a single slice is a 2D
image (its third axis is squeezed and restored on export); PNG files are 2D, an RGB PNG has 3 channels.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from mosaicseg.atomic import atomic_path
from mosaicseg.errors import MosaicSegError

CANONICAL_ORIENTATION = "LPS"
SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")


def file_ending(path: str | Path) -> str:
    """The supported ending of ``path`` (``.nii.gz`` counts as one ending), or ``""``."""
    name = str(path).lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return ""


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in the world, as stored in its file and as used after reorientation.

    ``file_*`` describe the file as written (ITK convention, ``file_ndim`` axes, direction row-major
    flattened). ``spacing`` and ``shape`` describe the returned array (canonical orientation, singleton
    slice of a 2D NIfTI squeezed). ``orientation`` is the file's orientation code (e.g. ``PSR``).
    """

    file_ndim: int
    file_shape: tuple[int, ...]
    file_spacing: tuple[float, ...]
    file_origin: tuple[float, ...]
    file_direction: tuple[float, ...]
    orientation: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    squeezed_axis: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**tuples)

    def same_grid(self, other: Geometry, rtol: float = 1e-3, atol: float = 1e-3) -> bool:
        """Same shape, spacing, origin and direction within tolerance (images vs. labels)."""
        return (
            self.file_shape == other.file_shape
            and np.allclose(self.file_spacing, other.file_spacing, rtol=rtol, atol=atol)
            and np.allclose(self.file_origin, other.file_origin, rtol=rtol, atol=atol)
            and np.allclose(self.file_direction, other.file_direction, rtol=rtol, atol=atol)
        )


def _orientation_of(image: sitk.Image) -> str:
    if image.GetDimension() != 3:
        return ""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _read_sitk(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except PermissionError as exc:  # pragma: no cover - SimpleITK raises RuntimeError in practice
        raise MosaicSegError(f"{path}: cannot read the file (permission denied). Fix: make it readable.") from exc
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise MosaicSegError(
            f"{path}: cannot read the image ({first}). Fix: check that the file is complete and really "
            f"is a {file_ending(path) or 'supported'} image (re-export or re-download it)."
        ) from exc


def _read_png(path: Path) -> tuple[np.ndarray, Geometry]:
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except PermissionError as exc:
        raise MosaicSegError(f"{path}: cannot read the file (permission denied). Fix: make it readable.") from exc
    except Exception as exc:  # PIL raises many types for corrupt files
        raise MosaicSegError(
            f"{path}: cannot read the PNG ({exc}). Fix: check that the file is a complete PNG image."
        ) from exc
    if arr.ndim == 2:
        arr = arr[None]
    else:
        if arr.shape[-1] in (2, 4):  # LA / RGBA: alpha carries no image information in this domain
            arr = arr[..., :-1]
        arr = np.moveaxis(arr, -1, 0)
    shape = tuple(int(s) for s in arr.shape[1:])
    geometry = Geometry(
        file_ndim=2,
        file_shape=shape,
        file_spacing=(1.0, 1.0),
        file_origin=(0.0, 0.0),
        file_direction=(1.0, 0.0, 0.0, 1.0),
        orientation="",
        shape=shape,
        spacing=(1.0, 1.0),
    )
    return np.ascontiguousarray(arr), geometry


def _nifti_header(head: bytes) -> tuple[int, int, np.dtype] | None:
    """(data offset, data bytes, voxel dtype) from the first bytes of a NIfTI-1/2 file; None if not parseable."""
    if len(head) < 4:
        return None
    nifti2 = 540 in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
    if len(head) < (540 if nifti2 else 348):
        return None
    try:
        header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header).from_fileobj(io.BytesIO(head))
        dtype = np.dtype(header.get_data_dtype())
        return int(header.get_data_offset()), int(np.prod(header.get_data_shape())) * dtype.itemsize, dtype
    except Exception:  # nibabel raises many types; ITK could read the header, so do not second-guess it
        return None


def _complete_by_size(path: Path, parsed: tuple[int, int, np.dtype], gz: bool) -> bool:
    """Cheap completeness test: file size, or the gzip trailer's uncompressed size (ISIZE, modulo 2**32)."""
    expected = parsed[0] + parsed[1]
    if not gz:
        return path.stat().st_size >= expected
    with path.open("rb") as f:
        f.seek(-4, os.SEEK_END)
        # a truncated stream ends in compressed bytes that match by chance with probability 2**-32
        return int.from_bytes(f.read(4), "little") == expected % 2**32


def scan_nifti(path: Path) -> tuple[str | None, int]:
    """(what is missing from the file or None, number of NaN/inf voxels), streaming the raw voxels once.

    ITK's NIfTI reader silently fills a truncated file (interrupted download or copy) with zeros and turns
    NaN/inf into 0, so neither is visible in the array that :func:`read_image` returns.
    """
    gz = str(path).lower().endswith(".gz")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gz else None
    head, parsed, pos, nonfinite, carry = b"", None, 0, 0, b""

    def feed(out: bytes, at: int) -> None:
        nonlocal nonfinite, carry
        offset, nbytes, dtype = parsed  # type: ignore[misc]
        if dtype.kind not in "fc":
            return
        data = carry + out[max(0, offset - at) : max(0, offset + nbytes - at)]
        usable = len(data) - len(data) % dtype.itemsize
        values = np.frombuffer(data[:usable], dtype=dtype)
        nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
        carry = data[usable:]

    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                out = inflate.decompress(chunk) if inflate else chunk
                if parsed is None:
                    head += out
                    parsed = _nifti_header(head)
                    if parsed is None and len(head) >= 540:
                        return None, 0
                    if parsed is not None and parsed[2].kind not in "fc" and _complete_by_size(path, parsed, gz):
                        return None, 0  # integer voxels cannot be NaN: the size alone shows completeness
                    if parsed is not None:
                        feed(head, 0)
                else:
                    feed(out, pos)
                pos += len(out)
                if inflate is not None and inflate.eof:
                    break
    except zlib.error as exc:
        return f"corrupt compressed data ({exc})", nonfinite
    if inflate is not None and not inflate.eof:
        return "the compressed data end early (truncated download or copy)", nonfinite
    if parsed is None:
        return None, 0
    expected = parsed[0] + parsed[1]
    if pos < expected:
        return f"the file holds {pos} bytes but its header announces {expected} (truncated download or copy)", nonfinite
    return None, nonfinite


def _nifti_truncation(path: Path) -> str | None:
    """Why a NIfTI file is incomplete, or None; reads only its header and size (or gzip trailer).

    ITK zero-fills the missing part of a truncated file without complaint, so :func:`read_image` asks first.
    """
    gz = str(path).lower().endswith(".gz")
    try:
        with path.open("rb") as f:
            raw = f.read(1 << 16)
        if gz and raw[:2] != b"\x1f\x8b":
            return None  # not gzip at all: ITK's "cannot read" message fits better than "truncated"
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, 1024) if gz else raw[:1024]
    except zlib.error as exc:
        return f"corrupt compressed data ({exc})"
    except OSError:
        return None  # let ITK report it with its own message
    parsed = _nifti_header(head)
    if parsed is None or _complete_by_size(path, parsed, gz):
        return None
    return "the file is shorter than its header announces (truncated download or copy)"


_FLOAT_PIXELS = (sitk.sitkFloat32, sitk.sitkFloat64)


def _restore_nonfinite(path: Path, image: sitk.Image) -> sitk.Image:
    """``image`` with the NaN/±inf voxels of the NIfTI file put back where ITK's reader made them 0.

    Only float files can hold them; those are scanned once more (:func:`scan_nifti`) and, where any are found,
    read with nibabel for their positions (nibabel indexes the stored voxel grid as ITK does, x fastest), so
    that preprocessing can warn about them and treat them as it treats every other format's.
    """
    if image.GetPixelID() not in _FLOAT_PIXELS:
        return image
    _, nonfinite = scan_nifti(path)
    if not nonfinite:
        return image
    import nibabel as nib

    raw = np.asarray(nib.load(str(path)).dataobj)
    values = sitk.GetArrayFromImage(image)  # (Z, Y, X): the stored grid, reversed
    raw = raw.reshape(raw.shape[: values.ndim]).T if raw.ndim > values.ndim else raw.T
    if raw.shape != values.shape:
        return image  # an unusual layout: the caller still sees the voxels, as ITK read them
    bad = ~np.isfinite(raw)
    values[bad] = raw[bad]
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read one image file.

    Returns ``(array, geometry)`` with ``array`` of shape ``(C, X, Y[, Z])`` in canonical orientation
    (``C`` is 1 except for multi-component files such as RGB) in the file's own dtype (NIfTI scale
    slopes applied by SimpleITK). NaN and ±inf voxels are returned as they are in the file, NIfTI included
    (ITK alone would read them as 0); preprocessing replaces them with a warning.
    """
    path = Path(path)
    ending = file_ending(path)
    if not ending:
        raise MosaicSegError(f"{path}: unsupported file type. Fix: use one of {', '.join(SUPPORTED_ENDINGS)}.")
    if not path.is_file():
        raise MosaicSegError(f"{path}: file not found. Fix: check the path and the dataset's file_ending.")
    if ending == ".png":
        return _read_png(path)
    if ending in (".nii", ".nii.gz") and (why := _nifti_truncation(path)):
        raise MosaicSegError(f"{path}: incomplete image: {why}. Fix: re-download or re-export the file.")
    image = _read_sitk(path)
    if ending in (".nii", ".nii.gz"):
        image = _restore_nonfinite(path, image)
    return sitk_to_array(image, path)


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry, overwrite: bool = False) -> Path:
    """Write ``array`` of shape ``(X, Y[, Z])`` (canonical orientation, as returned by :func:`read_image`)
    with the original file geometry, atomically (temporary file + rename).

    Raises :class:`MosaicSegError` if ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MosaicSegError(f"{path}: exists already. Fix: pass overwrite (--overwrite) or choose another output.")
    if path.parent.exists() and not path.parent.is_dir():
        raise MosaicSegError(f"{path.parent}: is a file, not a folder. Fix: choose an output folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    with atomic_path(path, file_ending(path) or path.suffix) as tmp:
        if file_ending(path) == ".png":
            Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
        else:
            arr = array
            if geometry.squeezed_axis is not None:
                arr = np.expand_dims(arr, geometry.squeezed_axis)
            image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr)))
            if geometry.file_ndim == 3:
                # The canonical grid has identity-like axes; give it a consistent canonical direction,
                # then reorient back to the file's orientation and stamp the exact original geometry.
                canonical_dir = _canonical_direction(geometry)
                image.SetDirection(canonical_dir)
                image = sitk.DICOMOrient(image, geometry.orientation)
            if tuple(image.GetSize()) != geometry.file_shape:
                raise ValueError(f"restored shape {image.GetSize()} differs from the file shape {geometry.file_shape}")
            image.SetSpacing(geometry.file_spacing)
            image.SetOrigin(geometry.file_origin)
            image.SetDirection(geometry.file_direction)
            sitk.WriteImage(image, str(tmp), useCompression=file_ending(path) in (".nii.gz", ".nrrd", ".mha"))
    return path


def _canonical_direction(geometry: Geometry) -> tuple[float, ...]:
    """Direction of the canonical (LPS-reoriented) grid of a file with ``geometry``."""
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(geometry.file_direction)
    return sitk.DICOMOrient(probe, CANONICAL_ORIENTATION).GetDirection()


def read_header(path: str | Path) -> dict[str, Any]:
    """Geometry and pixel information without reading the voxels (``check`` uses it on every file)."""
    path = Path(path)
    if file_ending(path) == ".png":
        try:
            with Image.open(path) as im:
                mode, size = im.mode, im.size
        except PermissionError as exc:
            raise MosaicSegError(f"{path}: cannot read the file (permission denied). Fix: make it readable.") from exc
        except Exception as exc:
            raise MosaicSegError(f"{path}: cannot read the PNG header ({exc}). Fix: re-export the file.") from exc
        channels = {"L": 1, "I": 1, "I;16": 1, "F": 1, "RGB": 3, "RGBA": 3, "P": 1, "1": 1, "LA": 1}.get(mode, 1)
        return {"ndim": 2, "shape": (size[1], size[0]), "channels": channels}
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise MosaicSegError(f"{path}: cannot read the image header. Fix: check that the file is complete.") from exc
    return {
        "ndim": reader.GetDimension(),
        "shape": tuple(reader.GetSize()),
        "channels": reader.GetNumberOfComponents(),
    }


# --------------------------------------------------------------------------------------------- DICOM series
DICOM_ENDINGS = (".dcm", ".ima")
_SERIES_DESCRIPTION = "0008|103e"


def _quiet_gdcm(call: Any, *args: Any) -> Any:
    """``call(*args)`` without ITK's "No Series were found" warning, which is an answer here, not a problem."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return call(*args)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _series_description(first_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return "unreadable"
    if not reader.HasMetaDataKey(_SERIES_DESCRIPTION):
        return "no description"
    return reader.GetMetaData(_SERIES_DESCRIPTION).strip() or "no description"


def dicom_series_files(folder: str | Path) -> tuple[Path, ...] | None:
    """The slice files of the one DICOM series in ``folder`` (GDCM's order: along the slice normal), or None
    when the folder holds no DICOM series. Sub-folders are not searched.

    Raises :class:`MosaicSegError` listing every series (UID, description, number of files) when the folder
    holds several, since a case is one series.
    """
    folder = Path(folder)
    uids = _quiet_gdcm(sitk.ImageSeriesReader.GetGDCMSeriesIDs, str(folder))
    if not uids:
        return None
    files = {uid: _quiet_gdcm(sitk.ImageSeriesReader.GetGDCMSeriesFileNames, str(folder), uid) for uid in uids}
    if len(uids) > 1:
        listing = "; ".join(
            f"{uid} ('{_series_description(names[0])}', {len(names)} files)" for uid, names in files.items()
        )
        raise MosaicSegError(
            f"{folder}: holds {len(uids)} DICOM series ({listing}), but a case is one series. Fix: move each "
            "series into its own folder (named after the case) and pass those folders, or their parent folder, "
            "with -i."
        )
    return tuple(Path(f) for f in files[uids[0]])


def read_dicom_series(files: tuple[Path, ...] | list[Path]) -> tuple[np.ndarray, Geometry]:
    """Read one DICOM series (its slice files, as :func:`dicom_series_files` orders them) like
    :func:`read_image` reads a file: ``(C, X, Y[, Z])`` in canonical orientation, and the series' geometry
    (origin, spacing, direction as SimpleITK's ImageSeriesReader computes them from the slice positions) as
    the "file" geometry, so :func:`write_image` writes outputs (e.g. NIfTI) on the series' grid."""
    folder = Path(files[0]).parent
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise MosaicSegError(
            f"{folder}: cannot read the DICOM series ({first}). Fix: check that every slice file is complete "
            "(re-export or re-download the series)."
        ) from exc
    return sitk_to_array(image, folder)


def sitk_to_array(image: sitk.Image, source: str | Path) -> tuple[np.ndarray, Geometry]:
    """A SimpleITK image → ``(C, X, Y[, Z])`` array in canonical orientation and its :class:`Geometry`, as
    :func:`read_image` returns them (``source`` names the input in errors)."""
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise MosaicSegError(
            f"{source}: image has {dim} dimensions, expected 2 or 3. Fix: split 4D series into one file "
            "per channel (CASE_0000, CASE_0001, ...)."
        )
    file_geom = dict(
        file_ndim=dim,
        file_shape=tuple(int(s) for s in image.GetSize()),
        file_spacing=tuple(float(s) for s in image.GetSpacing()),
        file_origin=tuple(float(s) for s in image.GetOrigin()),
        file_direction=tuple(float(s) for s in image.GetDirection()),
        orientation=_orientation_of(image),
    )
    if dim == 3:
        image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    arr = sitk.GetArrayFromImage(image)  # (Z, Y, X[, C])
    arr = np.moveaxis(arr, -1, 0) if image.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    arr = np.transpose(arr, (0, *range(arr.ndim - 1, 0, -1)))  # -> (C, X, Y[, Z])
    spacing = tuple(float(s) for s in image.GetSpacing())
    squeezed = None
    singleton = [i for i, s in enumerate(arr.shape[1:]) if s == 1]
    if dim == 3 and len(singleton) == 1:
        # A one-slice volume (or DICOM series) is a 2D image whatever axis the slice lies on after reorientation.
        squeezed = singleton[0]
        arr = np.take(arr, 0, axis=squeezed + 1)
        spacing = tuple(s for i, s in enumerate(spacing) if i != squeezed)
    geometry = Geometry(
        **file_geom, shape=tuple(int(s) for s in arr.shape[1:]), spacing=spacing, squeezed_axis=squeezed
    )
    return np.ascontiguousarray(arr), geometry


def to_file_order(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``array`` ``(X, Y[, Z])`` on the canonical grid → the file's own voxel grid in numpy order ``(Z, Y, X)``
    (for a DICOM series: frame ``z`` lies on slice file ``z``), the inverse of :func:`read_image`'s reorientation."""
    arr = array.view(np.uint8) if array.dtype == bool else array  # ITK has no bool pixel type
    arr = arr if geometry.squeezed_axis is None else np.expand_dims(arr, geometry.squeezed_axis)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr)))
    if geometry.file_ndim == 3:
        image.SetDirection(_canonical_direction(geometry))
        image = sitk.DICOMOrient(image, geometry.orientation)
    out = sitk.GetArrayFromImage(image)
    return out.view(bool) if array.dtype == bool else out
