//! Logging set-up. The filter can be changed at run time through the admin
//! server, so a node can be debugged without a restart.
#![forbid(unsafe_code)]

use tracing_subscriber::{fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry};

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?}: {source} (examples: \"info\", \"outrigger=debug,warn\")")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
    #[error("changing the log filter failed: {0}")]
    Reload(#[from] reload::Error),
}

/// Changes the active log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Arc<std::sync::Mutex<String>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl").field("current", &self.current()).finish()
    }
}

impl LogControl {
    pub fn set(&self, filter: &str) -> Result<(), LoggingError> {
        let parsed = parse_filter(filter)?;
        self.handle.reload(parsed)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = filter.to_string();
        Ok(())
    }

    pub fn current(&self) -> String {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The HTTP/2 library warns once per connection it closes for a peer's
/// misbehaviour (e.g. resetting streams faster than they are accepted): a
/// hostile peer that reconnects would flood the log with it. The proxy
/// reports those closes itself, throttled and counted; the library's own
/// lines are kept to errors unless the filter names `h2`.
const QUIET_LIBRARIES: &str = "h2=error";

fn parse_filter(filter: &str) -> Result<EnvFilter, LoggingError> {
    let names_h2 = filter.split(',').any(|d| d.trim().starts_with("h2"));
    let full = if names_h2 { filter.to_string() } else { format!("{filter},{QUIET_LIBRARIES}") };
    EnvFilter::builder().parse(&full).map_err(|source| LoggingError::Filter { filter: filter.to_string(), source })
}

pub fn init(format: LogFormat, filter: &str) -> Result<LogControl, LoggingError> {
    let (filter_layer, handle) = reload::Layer::new(parse_filter(filter)?);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let result = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr)).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr))
            .try_init(),
    };
    result.map_err(|_| LoggingError::AlreadyInstalled)?;
    Ok(LogControl { handle, current: std::sync::Arc::new(std::sync::Mutex::new(filter.to_string())) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http2_library_logs_errors_only_unless_the_filter_names_it() {
        let directives = |f: &str| parse_filter(f).expect("a valid filter").to_string();
        assert!(directives("info").contains("h2=error"));
        assert!(directives("outrigger=debug,warn").contains("h2=error"));
        assert!(!directives("info,h2=debug").contains("h2=error"));
    }
}
