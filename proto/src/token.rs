//! The join token (`EDGE_KEY`).
//!
//! Layout: base64 (standard alphabet, no padding) of the UTF-8 string
//! `api_url|tunnel_host:port|tunnel_fingerprint|endpoint_id|secret`, where
//! `tunnel_fingerprint` is the lowercase hex SHA-256 of the gateway certificate (DER) and
//! `secret` is 32 random bytes in base64url without padding. The first four fields are what
//! Portainer puts in its key; the fifth is ours and never crosses the wire after enrolment.

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine as _};
use rand::RngCore;

/// Length of the per-environment join secret, in bytes.
pub const JOIN_SECRET_LEN: usize = 32;
/// A token longer than this is refused before it is decoded.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Standard alphabet; encodes without padding and accepts padding on decode, since people
/// paste tokens through tools that add it.
const TOKEN_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The per-environment join secret. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinSecret([u8; JOIN_SECRET_LEN]);

impl JoinSecret {
    pub fn generate() -> Self {
        let mut bytes = [0u8; JOIN_SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn from_bytes(bytes: [u8; JOIN_SECRET_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; JOIN_SECRET_LEN] {
        &self.0
    }

    /// base64url without padding, the form used inside tokens and stores.
    pub fn to_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_text(text: &str) -> Result<Self, TokenError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| TokenError::SecretEncoding)?;
        let bytes: [u8; JOIN_SECRET_LEN] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| TokenError::SecretLength(b.len()))?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinSecret(<redacted>)")
    }
}

/// A parsed join token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    /// Where the agent checks in, e.g. `https://cp.example.com:9443`.
    pub api_url: String,
    /// `host:port` of the tunnel gateway(s).
    pub tunnel_addr: String,
    /// SHA-256 of the gateway certificate (DER).
    pub tunnel_fingerprint: [u8; 32],
    pub endpoint_id: u64,
    pub secret: JoinSecret,
}

/// Why a join token was refused. Each message names the one thing that is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("join token is empty")]
    Empty,
    #[error("join token is {0} characters long, more than the {MAX_TOKEN_LEN} allowed")]
    TooLong(usize),
    #[error("join token is not valid base64 (standard alphabet, padding optional)")]
    Base64,
    #[error("join token does not decode to UTF-8 text")]
    Utf8,
    #[error("join token has {0} '|'-separated fields, expected 5 (api_url|tunnel_host:port|tunnel_fingerprint|endpoint_id|secret)")]
    FieldCount(usize),
    #[error("join token field api_url {0:?} is not an http(s) URL with a host")]
    ApiUrl(String),
    #[error("join token field tunnel address {0:?} is not host:port with a port in 1-65535")]
    TunnelAddr(String),
    #[error("join token field tunnel_fingerprint must be 64 hex characters (SHA-256), got {0} characters")]
    FingerprintLength(usize),
    #[error("join token field tunnel_fingerprint is not hexadecimal")]
    FingerprintHex,
    #[error("join token field endpoint_id {0:?} is not a positive integer")]
    EndpointId(String),
    #[error("join token field secret is not base64url without padding")]
    SecretEncoding,
    #[error("join token field secret decodes to {0} bytes, expected {JOIN_SECRET_LEN}")]
    SecretLength(usize),
}

impl JoinToken {
    /// Encodes the token as it is handed to an agent.
    pub fn encode(&self) -> String {
        let plain = format!(
            "{}|{}|{}|{}|{}",
            self.api_url,
            self.tunnel_addr,
            hex::encode(self.tunnel_fingerprint),
            self.endpoint_id,
            self.secret.to_text()
        );
        TOKEN_B64.encode(plain)
    }

    /// Parses a token, tolerating surrounding white space (copy and paste).
    pub fn parse(token: &str) -> Result<Self, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(token.len()));
        }
        let bytes = TOKEN_B64.decode(token).map_err(|_| TokenError::Base64)?;
        let plain = String::from_utf8(bytes).map_err(|_| TokenError::Utf8)?;
        let fields: Vec<&str> = plain.split('|').collect();
        let [api_url, tunnel_addr, fingerprint, endpoint_id, secret] = fields[..] else {
            return Err(TokenError::FieldCount(fields.len()));
        };
        Ok(Self {
            api_url: parse_api_url(api_url)?,
            tunnel_addr: parse_tunnel_addr(tunnel_addr)?,
            tunnel_fingerprint: parse_fingerprint(fingerprint)?,
            endpoint_id: parse_endpoint_id(endpoint_id)?,
            secret: JoinSecret::from_text(secret)?,
        })
    }
}

fn parse_api_url(raw: &str) -> Result<String, TokenError> {
    let err = || TokenError::ApiUrl(raw.to_owned());
    let url = url::Url::parse(raw).map_err(|_| err())?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(err());
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

fn parse_tunnel_addr(raw: &str) -> Result<String, TokenError> {
    let err = || TokenError::TunnelAddr(raw.to_owned());
    let (host, port) = raw.rsplit_once(':').ok_or_else(err)?;
    let host_ok =
        !host.is_empty() && !host.contains(|c: char| c.is_whitespace() || c == '/' || c == '|');
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(raw.to_owned()),
        _ => Err(err()),
    }
}

fn parse_fingerprint(raw: &str) -> Result<[u8; 32], TokenError> {
    if raw.len() != 64 {
        return Err(TokenError::FingerprintLength(raw.len()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(raw, &mut out).map_err(|_| TokenError::FingerprintHex)?;
    Ok(out)
}

fn parse_endpoint_id(raw: &str) -> Result<u64, TokenError> {
    match raw.parse::<u64>() {
        Ok(id) if id > 0 && !raw.starts_with('+') => Ok(id),
        _ => Err(TokenError::EndpointId(raw.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            api_url: "https://cp.example.com:9443".into(),
            tunnel_addr: "cp.example.com:8000".into(),
            tunnel_fingerprint: [0xab; 32],
            endpoint_id: 7,
            secret: JoinSecret::from_bytes([3; 32]),
        }
    }

    fn b64(s: &str) -> String {
        TOKEN_B64.encode(s)
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let enc = t.encode();
        assert!(!enc.contains('='));
        assert_eq!(JoinToken::parse(&enc).unwrap(), t);
        assert_eq!(JoinToken::parse(&format!("  {enc}\n")).unwrap(), t);
    }

    #[test]
    fn every_malformation_has_its_own_error() {
        let fp = "ab".repeat(32);
        let secret = JoinSecret::from_bytes([1; 32]).to_text();
        let cases: Vec<(String, TokenError)> = vec![
            ("".into(), TokenError::Empty),
            ("a".repeat(5000), TokenError::TooLong(5000)),
            ("not base64!".into(), TokenError::Base64),
            (TOKEN_B64.encode([0xff, 0xfe, 0xfd]), TokenError::Utf8),
            (b64("a|b|c|d"), TokenError::FieldCount(4)),
            (b64("a|b|c|d|e|f"), TokenError::FieldCount(6)),
            (
                b64(&format!("ftp://x|h:1|{fp}|1|{secret}")),
                TokenError::ApiUrl("ftp://x".into()),
            ),
            (
                b64(&format!("https://x|h:0|{fp}|1|{secret}")),
                TokenError::TunnelAddr("h:0".into()),
            ),
            (
                b64(&format!("https://x|h|{fp}|1|{secret}")),
                TokenError::TunnelAddr("h".into()),
            ),
            (
                b64(&format!("https://x|h:8000|abc|1|{secret}")),
                TokenError::FingerprintLength(3),
            ),
            (
                b64(&format!("https://x|h:8000|{}|1|{secret}", "zz".repeat(32))),
                TokenError::FingerprintHex,
            ),
            (
                b64(&format!("https://x|h:8000|{fp}|0|{secret}")),
                TokenError::EndpointId("0".into()),
            ),
            (
                b64(&format!("https://x|h:8000|{fp}|-3|{secret}")),
                TokenError::EndpointId("-3".into()),
            ),
            (
                b64(&format!("https://x|h:8000|{fp}|1|***")),
                TokenError::SecretEncoding,
            ),
            (
                b64(&format!("https://x|h:8000|{fp}|1|AAAA")),
                TokenError::SecretLength(3),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(JoinToken::parse(&input), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn portainer_four_field_key_is_refused_clearly() {
        let key = b64(&format!("https://p:9443|p:8000|{}|3", "00".repeat(32)));
        let err = JoinToken::parse(&key).unwrap_err();
        assert_eq!(err, TokenError::FieldCount(4));
        assert!(err.to_string().contains("expected 5"));
    }

    #[test]
    fn debug_hides_secret() {
        let dbg = format!("{:?}", sample());
        assert!(dbg.contains("<redacted>"));
        assert!(!dbg.contains(&sample().secret.to_text()));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = JoinToken::parse(&s);
        }

        #[test]
        fn encoded_tokens_parse(id in 1u64.., fp in proptest::array::uniform32(0u8..), port in 1u16..) {
            let t = JoinToken {
                api_url: "https://h.example:9443".into(),
                tunnel_addr: format!("h.example:{port}"),
                tunnel_fingerprint: fp,
                endpoint_id: id,
                secret: JoinSecret::generate(),
            };
            proptest::prop_assert_eq!(JoinToken::parse(&t.encode()).unwrap(), t);
        }
    }
}
