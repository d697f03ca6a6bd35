"""Files from elsewhere never run code: checksummed, signed folders and checked program files.

- `checksums`: sha256 of every file of an exported folder, signed with this install's key, so
  a changed file is refused by name and a folder made here is told apart from one from elsewhere.
- `pt2_archive`: a torch.export archive is opened only if every member is on an allow-list of
  non-pickle formats and its graph calls only ATen operators (no guard code, no Python objects).
- `onnx_model`: an ONNX file may reference external data only inside its own folder.
"""

from dsno.trust.checksums import (
    CHECKSUM_FILE,
    TamperedFileError,
    sha256_file,
    verify_checksums,
    write_checksums,
)
from dsno.trust.onnx_model import check_onnx_model
from dsno.trust.pt2_archive import check_pt2_archive

__all__ = ["CHECKSUM_FILE", "TamperedFileError", "check_onnx_model", "check_pt2_archive", "sha256_file",
           "verify_checksums", "write_checksums"]
