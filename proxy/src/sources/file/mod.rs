//! The mesh file: a YAML file listing pods, services and authorization
//! policies — the embedded default for the demo, tests and clusters without
//! an API.
//!
//! ```yaml
//! pods:
//!   - name: web-0
//!     namespace: shop
//!     serviceAccount: web
//!     netns: /var/run/netns/web-0
//!     ips: [10.244.1.5, fd00:244:1::5]
//! services:
//!   - name: web
//!     namespace: shop
//!     vips: [10.96.0.10, fd00:96::10]
//!     ports: [{port: 80, targetPort: 8080}]
//!     endpoints:
//!       - pod: web-0              # a pod in this file (namespace: the service's)
//!       - address: 10.244.2.7     # or a plain address
//!         weight: 2
//! ```
//!
//! **Whole-file rule.** A file is written by one person at one time; a
//! half-applied edit is a state nobody wrote. So the file is parsed and
//! validated as a whole (with the same per-object and cross-object rules
//! the store applies), and a file with any problem is refused with one
//! message while the last good file stays in force. Once valid, it is
//! compared object by object with what was applied before and only the
//! differences reach the store: unchanged pods and services are not
//! touched, however often the file is rewritten.
//!
//! **Hostile files.** The file is read only if it is a regular file (a FIFO
//! or device would block or never end), opened non-blocking, and read up to
//! `--max-mesh-file-bytes`; the parser enforces a nesting depth and node
//! budget. Parsing runs on a blocking thread, never on an async worker.
#![forbid(unsafe_code)]

mod format;
mod routes;
mod translate;
pub mod watch;

use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::{
    model::{Object, ObjectRef},
    store::{Change, Store, StoreSettings},
};

/// Limits on what the file may cost to read.
#[derive(Debug, Clone, Copy)]
pub struct FileLimits {
    pub max_bytes: u64,
    /// Deepest nesting of YAML collections.
    pub max_depth: usize,
}

impl Default for FileLimits {
    fn default() -> Self {
        Self { max_bytes: 16 * 1024 * 1024, max_depth: 32 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} is {kind}, not a regular file: point --pods-file at a file (a symlink to one is fine)")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than {limit} bytes: raise --max-mesh-file-bytes or split the mesh state")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path} is not valid mesh YAML: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// What one check of the file found.
#[derive(Debug)]
pub enum Loaded {
    /// Same bytes as last time.
    Unchanged,
    /// New contents; these changes bring the store in line with them.
    Changed { changes: Vec<Change>, objects: usize },
}

/// The mesh file as a source: remembers what it applied, so each change of
/// the file becomes per-object changes.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    limits: FileLimits,
    settings: StoreSettings,
    last_bytes: Option<Vec<u8>>,
    applied: BTreeMap<ObjectRef, Object>,
}

impl FileSource {
    pub fn new(path: &Path, limits: FileLimits, settings: StoreSettings) -> Self {
        Self { path: path.to_path_buf(), limits, settings, last_bytes: None, applied: BTreeMap::new() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file (blocking: call it off the async workers). A file
    /// whose bytes did not change is `Unchanged`, also when it was refused
    /// before, so one bad file is reported once.
    pub fn load(&mut self) -> Result<Loaded, FileError> {
        let bytes = match read_limited(&self.path, self.limits.max_bytes) {
            Ok(bytes) => bytes,
            Err(e) => {
                // Parse the next readable file again, even if it has the
                // bytes of the last one: that is how its error clears.
                self.last_bytes = None;
                return Err(e);
            }
        };
        if self.last_bytes.as_deref() == Some(&bytes[..]) {
            return Ok(Loaded::Unchanged);
        }
        self.last_bytes = Some(bytes);
        let bytes = self.last_bytes.as_deref().unwrap_or_default();
        let objects = self.parse(bytes)?;
        let count = objects.len();
        let wanted: BTreeMap<ObjectRef, Object> = objects.into_iter().map(|o| (o.object_ref(), o)).collect();
        let mut changes: Vec<Change> =
            self.applied.keys().filter(|r| !wanted.contains_key(*r)).map(|r| Change::Delete(r.clone())).collect();
        changes.extend(
            wanted.iter().filter(|(r, o)| self.applied.get(*r) != Some(*o)).map(|(_, o)| Change::Upsert(o.clone())),
        );
        self.applied = wanted;
        Ok(Loaded::Changed { changes, objects: count })
    }

    /// Parses, translates and validates the whole file.
    fn parse(&self, bytes: &[u8]) -> Result<Vec<Object>, FileError> {
        parse_bytes(&self.path, bytes, self.limits, &self.settings)
    }
}

/// A mesh file's bytes to model objects, validated as a whole (the path is
/// only for messages). Public for the fuzz target.
pub fn parse_bytes(
    path: &Path,
    bytes: &[u8],
    limits: FileLimits,
    settings: &StoreSettings,
) -> Result<Vec<Object>, FileError> {
    let path = || path.to_path_buf();
    if bytes.len() as u64 > limits.max_bytes {
        return Err(FileError::TooLarge { path: path(), limit: limits.max_bytes });
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| FileError::Invalid { path: path(), problem: format!("not UTF-8: {e}") })?;
    let objects = parse_text(text, limits.max_depth)
        .map_err(|reason| FileError::Parse { path: path(), reason })
        .and_then(|file| translate::objects(file).map_err(|problem| FileError::Invalid { path: path(), problem }))?;
    // The store's own rules decide validity: a scratch store must take
    // every object.
    let mut scratch = Store::new(settings.clone());
    for object in &objects {
        scratch
            .upsert(object.clone())
            .map_err(|r| FileError::Invalid { path: path(), problem: format!("{}: {}", r.object, r.reason) })?;
    }
    Ok(objects)
}

/// YAML → the file's shape, with the parser's budget on depth and size.
fn parse_text(text: &str, max_depth: usize) -> Result<format::MeshFile, String> {
    if text.trim().is_empty() {
        return Ok(format::MeshFile::default());
    }
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = max_depth;
    budget.flow_nesting_limit = max_depth;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    serde_saphyr::from_str_with_options(text, options).map_err(|e| e.to_string())
}

/// Reads a regular file, at most `max` bytes, without ever blocking on a
/// FIFO or a device.
fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let read_err = |e: std::io::Error| FileError::Read { path: path.to_path_buf(), reason: e.to_string() };
    // Follows symlinks (ConfigMaps are symlinks to regular files).
    let kind = std::fs::metadata(path).map_err(read_err)?.file_type();
    if !kind.is_file() {
        return Err(FileError::NotRegular { path: path.to_path_buf(), kind: describe(kind) });
    }
    // O_NONBLOCK: if the path was swapped for a FIFO since the check, open
    // and read return at once instead of hanging the reload loop.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular { path: path.to_path_buf(), kind: describe(meta.file_type()) });
    }
    if meta.len() > max {
        return Err(FileError::TooLarge { path: path.to_path_buf(), limit: max });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > max {
        return Err(FileError::TooLarge { path: path.to_path_buf(), limit: max });
    }
    Ok(bytes)
}

fn describe(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests;
