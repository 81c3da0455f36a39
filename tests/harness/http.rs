//! GET from an admin server (the proxy's own minimal HTTP/1.0 client).

use std::net::SocketAddr;

use anyhow::Result;

pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    Ok(outrigger::stats::http_get(addr, path)?)
}

pub fn post(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    Ok(outrigger::stats::http_request(addr, "POST", path)?)
}
