//! Connections to the daemon: endpoint URL, optional TLS with a private CA, timeouts, and
//! the bearer token every authenticated call carries.

use crate::error::ClientError;
use std::time::Duration;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Where the daemon is and how to reach it.
#[derive(Clone)]
pub struct DaemonEndpoint {
    /// `http://host:port` (loopback) or `https://host:port`.
    pub url: String,
    /// PEM of the CA that signed the daemon's certificate (`https` only). Without it an
    /// `https` URL is refused: this build carries no system trust roots.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// Server name to check the certificate against, if not the URL's host.
    pub tls_domain: Option<String>,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for DaemonEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonEndpoint")
            .field("url", &self.url)
            .field("tls_ca", &self.tls_ca_pem.as_ref().map(|_| "<pem>"))
            .field("tls_domain", &self.tls_domain)
            .finish()
    }
}

impl DaemonEndpoint {
    /// A plain endpoint with default timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        DaemonEndpoint {
            url: url.into(),
            tls_ca_pem: None,
            tls_domain: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The tonic endpoint, checked.
    pub fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let bad = |detail: String| ClientError::Connect { url: self.url.clone(), detail };
        let https = self.url.starts_with("https://");
        if !https && !self.url.starts_with("http://") {
            return Err(bad("the daemon URL must start with http:// or https://".into()));
        }
        let mut ep = Endpoint::from_shared(self.url.clone())
            .map_err(|e| bad(format!("not a valid URL: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        match (&self.tls_ca_pem, https) {
            (Some(pem), true) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
                if let Some(d) = &self.tls_domain {
                    tls = tls.domain_name(d.clone());
                }
                ep = ep.tls_config(tls).map_err(|e| bad(format!("TLS: {e}")))?;
            }
            (None, true) => {
                return Err(bad(
                    "https needs the CA certificate that signed the daemon's certificate: \
                     pass --tls-ca PATH"
                        .into(),
                ))
            }
            (Some(_), false) => {
                return Err(bad("a TLS CA was given but the URL is http://; use https://".into()))
            }
            (None, false) => {}
        }
        Ok(ep)
    }

    /// Connects one HTTP/2 connection now.
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        self.endpoint()?
            .connect()
            .await
            .map_err(|e| ClientError::Connect { url: self.url.clone(), detail: error_chain(&e) })
    }
}

/// `e: cause: cause…`, since transport errors hide the useful part in their sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Adds `authorization: Bearer <token>` to every call (nothing when there is no token).
#[derive(Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// The header for `token`; refused if it cannot be a header value.
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        match token {
            None => Ok(Bearer(None)),
            Some(t) => MetadataValue::try_from(format!("Bearer {}", t.trim()))
                .map(|v| Bearer(Some(v)))
                .map_err(|_| {
                    ClientError::Config(
                        "the token contains characters not allowed in a header".into(),
                    )
                }),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry a bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;
