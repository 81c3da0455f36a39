//! Workload identities and their certificates.
//!
//! Each pod's identity is the SPIFFE ID of its service account. The proxy
//! holds one certificate per identity present on its node — never a
//! node-wide one — and presents the source pod's when it originates a
//! tunnel, the destination pod's when it accepts one.
//!
//! Certificates come from a [`CertificateSource`]: a watched directory
//! (what cert-manager's csi-driver-spiffe or a SPIRE helper writes) or the
//! built-in CA. Either way a new certificate is checked before use (key
//! matches, names the identity, valid now, chains to the bundle); a bad one
//! is refused with the reason and the previous one is kept until it
//! expires. New handshakes pick up a rotated certificate at once; open
//! connections are not touched.
#![forbid(unsafe_code)]

pub mod ca;
pub mod cert;
mod dir;
mod spiffe;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use serde::Serialize;

pub use cert::{TrustBundle, WorkloadCert};
pub use dir::DirSource;

pub use spiffe::{Identity, NotASpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no certificate for {id} yet{}: {hint}", .reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Missing { id: String, reason: Option<String>, hint: &'static str },
    #[error("the certificate for {id} expired at {at} (unix time) and no valid replacement arrived: {hint}")]
    Expired { id: String, at: u64, hint: &'static str },
    #[error("no trust bundle loaded{}: {hint}", .reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    NoBundle { reason: Option<String>, hint: &'static str },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] ca::CaError),
}

/// A certificate chain and its key, as PEM.
pub type PemPair = (Vec<u8>, Vec<u8>);

/// Where certificates come from.
pub trait CertificateSource: Send + Sync + 'static {
    /// For logs and /config_dump: "directory DIR" or "built-in CA DIR".
    fn describe(&self) -> String;
    /// What an operator should check when a certificate is missing.
    fn hint(&self) -> &'static str;
    /// The trust bundle's PEM as it is now.
    fn bundle_pem(&self) -> Result<Vec<u8>, IdentityError>;
    /// A new (chain PEM, key PEM) for `id` to consider, or `None` when the
    /// current one should stay (unchanged file, not yet at half-life).
    fn fetch(&self, id: &Identity, current: Option<&WorkloadCert>) -> Result<Option<PemPair>, IdentityError>;
}

#[derive(Debug, Default)]
struct Slot {
    cert: Option<Arc<WorkloadCert>>,
    /// Bumped on every new certificate: pooled connections made with an
    /// older one take no new streams.
    generation: u64,
    last_error: Option<String>,
}

/// A certificate and its generation.
#[derive(Debug, Clone)]
pub struct CurrentCert {
    pub cert: Arc<WorkloadCert>,
    pub generation: u64,
}

/// The node's identities and their current certificates.
pub struct Identities {
    pub trust_domain: String,
    source: Box<dyn CertificateSource>,
    wanted: Mutex<BTreeSet<Identity>>,
    slots: Mutex<HashMap<Identity, Slot>>,
    bundle: ArcSwapOption<(TrustBundle, u64)>,
    bundle_bytes: Mutex<Option<Vec<u8>>>,
    bundle_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities").field("source", &self.source.describe()).finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Identities {
    pub fn new(trust_domain: &str, source: Box<dyn CertificateSource>) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            source,
            wanted: Mutex::default(),
            slots: Mutex::default(),
            bundle: ArcSwapOption::empty(),
            bundle_bytes: Mutex::default(),
            bundle_error: Mutex::default(),
        }
    }

    pub fn identity(&self, namespace: &str, service_account: &str) -> Identity {
        Identity::new(&self.trust_domain, namespace, service_account)
    }

    /// The identities of this node's pods; certificates of others are dropped.
    pub fn set_wanted(&self, ids: BTreeSet<Identity>) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| ids.contains(id));
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = ids;
    }

    /// Reloads the bundle and every wanted identity's certificate from the
    /// source: called at start, after reloads and periodically.
    pub fn refresh(&self) {
        self.refresh_bundle();
        let Some(bundle) = self.bundle.load_full() else { return };
        let wanted: Vec<Identity> = self.wanted.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        for id in wanted {
            let current = self.slots.lock().unwrap_or_else(|e| e.into_inner()).get(&id).and_then(|s| s.cert.clone());
            let fetched = match self.source.fetch(&id, current.as_deref()) {
                Ok(Some(pems)) => pems,
                Ok(None) => continue,
                Err(e) => {
                    self.record_error(&id, e.to_string(), current.as_deref());
                    continue;
                }
            };
            match cert::load_workload_cert(&fetched.0, &fetched.1, &id, &bundle.0, SystemTime::now()) {
                Ok(new) => {
                    tracing::info!(identity = %id, serial = %new.serial, expires = unix(new.not_after),
                        rotated = current.is_some(), "workload certificate loaded");
                    let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                    let slot = slots.entry(id).or_default();
                    slot.cert = Some(Arc::new(new));
                    slot.generation += 1;
                    slot.last_error = None;
                }
                Err(e) => self.record_error(&id, format!("refused: {e}"), current.as_deref()),
            }
        }
    }

    fn record_error(&self, id: &Identity, error: String, current: Option<&WorkloadCert>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(id.clone()).or_default();
        if slot.last_error.as_ref() != Some(&error) {
            match current {
                Some(c) => tracing::error!(identity = %id, error = %error, keeping_until = unix(c.not_after),
                    "new certificate not used; the previous one stays until it expires"),
                None => tracing::error!(identity = %id, error = %error, "no certificate for this identity"),
            }
        }
        slot.last_error = Some(error);
    }

    fn refresh_bundle(&self) {
        let result = self.source.bundle_pem().and_then(|pem| {
            let mut last = self.bundle_bytes.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_deref() == Some(&pem[..]) {
                return Ok(());
            }
            let bundle = TrustBundle::from_pem(&pem)
                .map_err(|e| IdentityError::NoBundle { reason: Some(e.to_string()), hint: self.source.hint() })?;
            let generation = self.bundle.load().as_ref().map(|b| b.1 + 1).unwrap_or(1);
            self.bundle.store(Some(Arc::new((bundle, generation))));
            *last = Some(pem);
            tracing::info!(source = %self.source.describe(), generation, "trust bundle loaded");
            Ok(())
        });
        let mut err = self.bundle_error.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => *err = None,
            Err(e) => {
                let message = e.to_string();
                if err.as_ref() != Some(&message) {
                    tracing::error!(error = %message, "trust bundle not loaded; the previous one stays");
                }
                *err = Some(message);
            }
        }
    }

    /// The current trust bundle and its generation.
    pub fn bundle(&self) -> Result<Arc<(TrustBundle, u64)>, IdentityError> {
        self.bundle.load_full().ok_or_else(|| IdentityError::NoBundle {
            reason: self.bundle_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            hint: self.source.hint(),
        })
    }

    /// The certificate to present as `id` now.
    pub fn current(&self, id: &Identity) -> Result<CurrentCert, IdentityError> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.get(id);
        match slot.and_then(|s| s.cert.clone()) {
            Some(cert) if cert.expired(SystemTime::now()) => {
                Err(IdentityError::Expired { id: id.to_string(), at: unix(cert.not_after), hint: self.source.hint() })
            }
            Some(cert) => Ok(CurrentCert { cert, generation: slot.map(|s| s.generation).unwrap_or(0) }),
            None => Err(IdentityError::Missing {
                id: id.to_string(),
                reason: slot.and_then(|s| s.last_error.clone()),
                hint: self.source.hint(),
            }),
        }
    }

    pub fn status(&self) -> IdentitiesStatus {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut certificates: Vec<CertStatus> = slots
            .iter()
            .map(|(id, s)| CertStatus {
                identity: id.to_string(),
                serial: s.cert.as_ref().map(|c| c.serial.clone()),
                not_after: s.cert.as_ref().map(|c| unix(c.not_after)),
                generation: s.generation,
                error: s.last_error.clone(),
            })
            .collect();
        certificates.sort_by(|a, b| a.identity.cmp(&b.identity));
        IdentitiesStatus {
            trust_domain: self.trust_domain.clone(),
            source: self.source.describe(),
            bundle_generation: self.bundle.load().as_ref().map(|b| b.1),
            bundle_error: self.bundle_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            certificates,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct IdentitiesStatus {
    pub trust_domain: String,
    pub source: String,
    pub bundle_generation: Option<u64>,
    pub bundle_error: Option<String>,
    /// Never private keys.
    pub certificates: Vec<CertStatus>,
}

#[derive(Debug, Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub serial: Option<String>,
    pub not_after: Option<u64>,
    pub generation: u64,
    pub error: Option<String>,
}

/// The built-in CA as a source: mints a certificate per identity and renews
/// it at half its lifetime.
pub struct CaSource {
    ca: ca::CertificateAuthority,
    dir: PathBuf,
    lifetime: Duration,
}

impl CaSource {
    pub fn new(dir: &std::path::Path, lifetime: Duration) -> Result<Self, IdentityError> {
        Ok(Self { ca: ca::CertificateAuthority::load(dir)?, dir: dir.to_path_buf(), lifetime })
    }
}

impl CertificateSource for CaSource {
    fn describe(&self) -> String {
        format!("built-in CA {}", self.dir.display())
    }

    fn hint(&self) -> &'static str {
        "check that --ca-dir holds the ca.crt and ca.key written by `outrigger ca init`"
    }

    fn bundle_pem(&self) -> Result<Vec<u8>, IdentityError> {
        Ok(self.ca.bundle_pem().as_bytes().to_vec())
    }

    fn fetch(
        &self,
        id: &Identity,
        current: Option<&WorkloadCert>,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, IdentityError> {
        if let Some(c) = current {
            if SystemTime::now() < c.half_life() {
                return Ok(None);
            }
        }
        let issued = self.ca.issue(id, self.lifetime, Duration::ZERO)?;
        Ok(Some((issued.chain_pem.into_bytes(), issued.key_pem.into_bytes())))
    }
}
