//! Certificates from a watched directory.
//!
//! Layout (what cert-manager's csi-driver-spiffe writes per identity, and
//! what a SPIRE agent helper can be told to write):
//!
//! ```text
//! DIR/ca.crt                              trust bundle (PEM, one or more CAs)
//! DIR/<namespace>/<service-account>/tls.crt   certificate chain, leaf first
//! DIR/<namespace>/<service-account>/tls.key   its private key (PKCS#8, SEC1 or PKCS#1)
//! ```
//!
//! Files are read on every refresh and compared with what was last
//! considered, so an unchanged file costs no parsing and a bad one is
//! reported once.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::{CertificateSource, Identity, IdentityError, WorkloadCert};

pub const BUNDLE_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

use super::PemPair as Pems;

pub struct DirSource {
    dir: PathBuf,
    last: Mutex<HashMap<Identity, Pems>>,
}

impl DirSource {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), last: Mutex::default() }
    }

    /// Where the certificate of `id` is expected.
    pub fn identity_dir(dir: &Path, id: &Identity) -> PathBuf {
        dir.join(&*id.namespace).join(&*id.service_account)
    }
}

fn read(path: PathBuf) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(&path).map_err(|source| IdentityError::Read { path, source })
}

impl CertificateSource for DirSource {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn hint(&self) -> &'static str {
        "is the certificate issuer (cert-manager, SPIRE) writing <cert-dir>/<namespace>/<service-account>/tls.crt and tls.key?"
    }

    fn bundle_pem(&self) -> Result<Vec<u8>, IdentityError> {
        read(self.dir.join(BUNDLE_FILE))
    }

    fn fetch(&self, id: &Identity, _current: Option<&WorkloadCert>) -> Result<Option<Pems>, IdentityError> {
        let base = Self::identity_dir(&self.dir, id);
        let pems = (read(base.join(CERT_FILE))?, read(base.join(KEY_FILE))?);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.get(id) == Some(&pems) {
            return Ok(None);
        }
        last.insert(id.clone(), pems.clone());
        Ok(Some(pems))
    }
}
