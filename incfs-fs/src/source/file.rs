//! A local image file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{RequestKind, Source, SourceError};

/// Reads an image from a local file with positioned reads.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    file: File,
    len: u64,
}

impl FileSource {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let io = |error| SourceError::Io {
            source_name: path.display().to_string(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
            len,
        })
    }
}

impl Source for FileSource {
    fn read_range(
        &self,
        offset: u64,
        len: u64,
        _kind: RequestKind,
    ) -> Result<Vec<u8>, SourceError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(SourceError::OutOfRange {
                source_name: self.describe(),
                offset,
                len,
                total: self.len,
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|error| SourceError::Io {
                source_name: self.describe(),
                error,
            })?;
        Ok(buf)
    }

    fn total_len(&self) -> Result<u64, SourceError> {
        Ok(self.len)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
