//! Watching the mesh file by polling its contents. Polling (rather than
//! inotify) survives every way files get replaced — editors' renames,
//! Kubernetes ConfigMap symlink swaps — and costs one small read per tick.

use std::path::{Path, PathBuf};

use super::{MeshFileError, MeshState};

/// Reads the file and reports a new state only when its bytes changed.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    last: Option<Vec<u8>>,
}

impl FileWatch {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), last: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok(None)` when unchanged since the last call. A file that fails to
    /// parse is remembered too, so the same error is reported once.
    pub async fn poll(&mut self) -> Result<Option<MeshState>, MeshFileError> {
        let bytes = tokio::fs::read(&self.path)
            .await
            .map_err(|source| MeshFileError::Read { path: self.path.clone(), source })?;
        if self.last.as_deref() == Some(&bytes[..]) {
            return Ok(None);
        }
        self.last = Some(bytes);
        let bytes = self.last.as_deref().unwrap_or_default();
        let text = std::str::from_utf8(bytes)
            .map_err(|e| MeshFileError::Invalid { path: self.path.clone(), problem: format!("not UTF-8: {e}") })?;
        MeshState::parse(&self.path, text).map(Some)
    }
}
