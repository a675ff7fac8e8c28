//! TLS to the broker (`amqps://`): the certificates of `[broker.tls]` loaded into a rustls
//! connector, and a failed handshake told apart (wrong CA, expired certificate, wrong host name,
//! a plain AMQP listener).
//!
//! [`connection`](crate::connection) uses it for every `amqps://` address; an `amqp://` address
//! never gets here, and [`Config::validate`](crate::Config::validate) refuses `[broker.tls]`
//! beside one, so a TLS setting is never silently dropped. Without `ca_file` the system's trust
//! store is used (a managed broker with a public certificate); with it, only that CA is
//! trusted. A client certificate (`cert_file` + `key_file`) is presented when the broker asks,
//! and makes the login SASL EXTERNAL (the user is the certificate's name) unless the URL asks
//! for a mechanism (`?auth_mechanism=plain`). The crypto is rustls with the `ring` provider: no
//! OpenSSL.

use std::path::{Path, PathBuf};

use lapin::tcp::{RustlsConnector, RustlsConnectorConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Why the TLS settings could not be used (read when connecting is set up, before any attempt).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {key} {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path} holds no PEM certificate{detail}")]
    NoCertificate {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("broker.tls.key_file {path} holds no PEM private key ({reason})")]
    NoKey { path: PathBuf, reason: String },
    #[error("broker.tls.cert_file and broker.tls.key_file go together: {0} is missing")]
    Incomplete(&'static str),
    #[error("broker.tls: {0}")]
    Rustls(std::io::Error),
}

/// A ready TLS client: the connector (shared by every connection) and the name to check.
#[derive(Clone, Debug)]
pub struct TlsClient {
    pub(crate) connector: RustlsConnector,
    /// `broker.tls.server_name`: the name the broker's certificate must carry, instead of the
    /// URL's host.
    pub(crate) server_name: Option<String>,
    /// Whether a client certificate is presented (login by SASL EXTERNAL).
    pub(crate) client_certificate: bool,
}

impl TlsClient {
    /// Loads the files named by `tls` (each once: connections share the connector).
    pub fn new(tls: &TlsConfig) -> Result<TlsClient, TlsSetupError> {
        let mut roots = RustlsConnectorConfig::default();
        match &tls.ca_file {
            Some(path) => {
                let certificates = read_certificates("broker.tls.ca_file", path)?;
                roots.add_parsable_certificates(certificates);
            }
            None => {
                roots = RustlsConnectorConfig::new_with_native_certs()
                    .map_err(TlsSetupError::Rustls)?;
            }
        }
        let connector = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certificates("broker.tls.cert_file", cert)?;
                let key = read_key(key)?;
                roots.connector_with_single_cert(chain, key)
            }
            (None, None) => roots.connector_with_no_client_auth(),
            (Some(_), None) => return Err(TlsSetupError::Incomplete("key_file")),
            (None, Some(_)) => return Err(TlsSetupError::Incomplete("cert_file")),
        }
        .map_err(TlsSetupError::Rustls)?;
        Ok(TlsClient {
            connector,
            server_name: tls.server_name.clone(),
            client_certificate: tls.cert_file.is_some(),
        })
    }

    /// The name the broker's certificate is checked against (and sent as SNI).
    pub(crate) fn server_name<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(key, path)?;
    let no_certificate = |detail: String| TlsSetupError::NoCertificate {
        key,
        path: path.to_path_buf(),
        detail,
    };
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| no_certificate(format!(" ({err})")))?;
    if certificates.is_empty() {
        return Err(no_certificate(String::new()));
    }
    Ok(certificates)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = read("broker.tls.key_file", path)?;
    // The error names the file, never its content.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| TlsSetupError::NoKey {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })
}

/// What went wrong in a TLS handshake, for [`ConnectError::Tls`](crate::connection::ConnectError).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The broker's certificate is not signed by a trusted CA (`broker.tls.ca_file`).
    UnknownIssuer,
    /// The broker's certificate (or one of its chain) has expired.
    Expired,
    /// The broker's certificate is not yet valid.
    NotYetValid,
    /// The broker's certificate does not name the host connected to (or `server_name`).
    WrongHostName,
    /// The broker refused the client certificate, or wanted one and got none.
    ClientCertificateRefused,
    /// The peer does not speak TLS: most likely a plain `amqp://` listener.
    NotTls,
    /// Any other handshake failure.
    Other,
}

impl TlsFailure {
    /// Tells a handshake failure apart from a lapin connection error, if it is one.
    pub fn of(error: &lapin::Error) -> Option<(TlsFailure, String)> {
        let lapin::ErrorKind::IOError(io) = error.kind() else {
            return None;
        };
        let rustls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
        Some((TlsFailure::classify(rustls), rustls.to_string()))
    }

    fn classify(error: &rustls::Error) -> TlsFailure {
        use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
        match error {
            Error::InvalidCertificate(cert) => match cert {
                Cert::UnknownIssuer | Cert::BadSignature | Cert::UnknownRevocationStatus => {
                    TlsFailure::UnknownIssuer
                }
                Cert::Expired | Cert::ExpiredContext { .. } => TlsFailure::Expired,
                Cert::NotValidYet | Cert::NotValidYetContext { .. } => TlsFailure::NotYetValid,
                Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                    TlsFailure::WrongHostName
                }
                _ => TlsFailure::Other,
            },
            Error::AlertReceived(
                Alert::CertificateRequired
                | Alert::BadCertificate
                | Alert::UnknownCA
                | Alert::CertificateUnknown
                | Alert::AccessDenied,
            ) => TlsFailure::ClientCertificateRefused,
            Error::InvalidMessage(_) | Error::PeerIncompatible(_) => TlsFailure::NotTls,
            _ => TlsFailure::Other,
        }
    }

    /// One sentence for the operator: what is wrong and what to check.
    pub fn explain(self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer => {
                "the broker's certificate is not signed by a trusted CA (check broker.tls.ca_file / \
                 WARREN_TLS_CA_FILE: it must hold the CA that signed the broker's certificate)"
            }
            TlsFailure::Expired => "the broker's certificate has expired",
            TlsFailure::NotYetValid => {
                "the broker's certificate is not valid yet (check the clocks)"
            }
            TlsFailure::WrongHostName => {
                "the broker's certificate is not issued for this host name (connect with the name \
                 the certificate carries, or set broker.tls.server_name / WARREN_TLS_SERVER_NAME)"
            }
            TlsFailure::ClientCertificateRefused => {
                "the broker refused the client certificate, or requires one (broker.tls.cert_file \
                 and key_file)"
            }
            TlsFailure::NotTls => {
                "the server does not speak TLS: is this a plain amqp:// listener? (AMQPS is usually \
                 port 5671; amqps:// is never downgraded to plaintext)"
            }
            TlsFailure::Other => "the TLS handshake failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_files_are_named() {
        let tls = TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        };
        let err = TlsClient::new(&tls).expect_err("no such file");
        assert!(
            err.to_string()
                .contains("broker.tls.ca_file /nonexistent/ca.pem"),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("warren-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let tls = TlsConfig {
            ca_file: Some(empty.clone()),
            ..TlsConfig::default()
        };
        let err = TlsClient::new(&tls).expect_err("no certificate");
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_certificate_needs_its_key() {
        let tls = TlsConfig {
            cert_file: Some("/x/client.pem".into()),
            ..TlsConfig::default()
        };
        let err = TlsClient::new(&tls).expect_err("no key");
        assert!(err.to_string().contains("key_file is missing"), "{err}");
    }

    #[test]
    fn handshake_failures_are_told_apart() {
        use rustls::{CertificateError, Error};
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsFailure::UnknownIssuer,
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                TlsFailure::Expired,
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidForName),
                TlsFailure::WrongHostName,
            ),
            (
                Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                TlsFailure::NotTls,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(TlsFailure::classify(&error), expected, "{error}");
        }
    }
}
