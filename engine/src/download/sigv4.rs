//! AWS Signature Version 4 in the `Authorization` header: what S3 and the S3-compatible stores
//! (MinIO, Ceph RGW, R2) accept from a client holding an access key. Only what a download needs:
//! requests without a body (GET), the URI and query canonicalized as S3 does (each path segment
//! encoded once, no dot-segment normalization). Checked against AWS's published examples.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};
use reqwest::Url;
use sha2::{Digest, Sha256};

/// The SHA-256 of an empty payload, which a GET signs as its body.
pub(crate) const EMPTY_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// SigV4's URI encoding escapes every byte but RFC 3986's unreserved characters.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The same, keeping `/`: an object key as a URL path.
const ESCAPED_BUT_SLASH: &AsciiSet = &ESCAPED.remove(b'/');

/// A query value or a single path segment, encoded as SigV4 signs it.
pub(crate) fn encode(s: &str) -> String {
    percent_encode(s.as_bytes(), ESCAPED).to_string()
}

/// An object key as a URL path, encoded as SigV4 signs it.
pub(crate) fn encode_path(s: &str) -> String {
    percent_encode(s.as_bytes(), ESCAPED_BUT_SLASH).to_string()
}

/// An access key: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and, for temporary credentials,
/// `AWS_SESSION_TOKEN`. `Debug` shows the key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A request time in SigV4's two forms: `YYYYMMDD` for the scope, `YYYYMMDDTHHMMSSZ` for
/// `x-amz-date`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AmzDate {
    pub(crate) day: String,
    pub(crate) stamp: String,
}

impl AmzDate {
    pub(crate) fn at(t: SystemTime) -> Self {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (y, m, d) = civil_from_days(secs / 86_400);
        let s = secs % 86_400;
        let day = format!("{y:04}{m:02}{d:02}");
        let stamp = format!("{day}T{:02}{:02}{:02}Z", s / 3600, s / 60 % 60, s % 60);
        AmzDate { day, stamp }
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), by whole 400-year eras.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// `host[:port]` as the HTTP client sends it: the port only when it is not the scheme's default.
fn host_header(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// Each path segment decoded and re-encoded once, so the signature covers exactly the key.
fn canonical_uri(url: &Url) -> String {
    let path = url.path();
    if path.is_empty() {
        return "/".into();
    }
    path.split('/')
        .map(|seg| {
            let raw: Vec<u8> = percent_decode_str(seg).collect();
            percent_encode(&raw, ESCAPED).to_string()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Parameters decoded, re-encoded and sorted by name, then value.
fn canonical_query(url: &Url) -> String {
    let Some(query) = url.query() else {
        return String::new();
    };
    let enc = |s: &str| {
        let raw: Vec<u8> = percent_decode_str(s).collect();
        percent_encode(&raw, ESCAPED).to_string()
    };
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (enc(k), enc(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The `Authorization` value for a request to `url` that carries `headers` (besides `Host`,
/// which is always signed), all of them signed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn authorization(
    method: &str,
    url: &Url,
    headers: &[(&str, &str)],
    payload_sha256: &str,
    creds: &Credentials,
    region: &str,
    service: &str,
    date: &AmzDate,
) -> String {
    let mut canon: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    canon.push(("host".into(), host_header(url)));
    canon.sort();
    let signed = canon
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_headers: String = canon.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical_request = format!(
        "{method}\n{}\n{}\n{canonical_headers}\n{signed}\n{payload_sha256}",
        canonical_uri(url),
        canonical_query(url)
    );
    let scope = format!("{}/{region}/{service}/aws4_request", date.day);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        date.stamp,
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = hmac(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        &date.day,
    );
    for part in [region, service, "aws4_request"] {
        key = hmac(&key, part);
    }
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={}",
        creds.access_key_id,
        hex(&hmac(&key, &string_to_sign))
    )
}

/// The headers that sign a GET of `url` to S3 at `now`: `x-amz-date`, `x-amz-content-sha256`,
/// `x-amz-security-token` with temporary credentials, and `Authorization`. Headers the caller
/// adds besides these (`Range`, `If-Match`) are sent unsigned, which S3 allows.
pub(crate) fn s3_get_headers(
    url: &Url,
    creds: &Credentials,
    region: &str,
    now: SystemTime,
) -> Vec<(&'static str, String)> {
    let date = AmzDate::at(now);
    let mut headers: Vec<(&'static str, String)> = vec![
        ("x-amz-content-sha256", EMPTY_SHA256.to_string()),
        ("x-amz-date", date.stamp.clone()),
    ];
    if let Some(token) = &creds.session_token {
        headers.push(("x-amz-security-token", token.clone()));
    }
    let signed: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let auth = authorization(
        "GET",
        url,
        &signed,
        EMPTY_SHA256,
        creds,
        region,
        "s3",
        &date,
    );
    headers.push(("authorization", auth));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(unix: u64) -> AmzDate {
        AmzDate::at(UNIX_EPOCH + Duration::from_secs(unix))
    }

    fn creds(id: &str, secret: &str, token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: id.into(),
            secret_access_key: secret.into(),
            session_token: token.map(Into::into),
        }
    }

    fn signature(auth: &str) -> &str {
        auth.rsplit("Signature=").next().unwrap()
    }

    #[test]
    fn request_times_format_as_sigv4_dates() {
        assert_eq!(
            at(1_440_938_160),
            AmzDate {
                day: "20150830".into(),
                stamp: "20150830T123600Z".into()
            }
        );
        assert_eq!(at(1_369_353_600).stamp, "20130524T000000Z");
        assert_eq!(at(1_709_251_199).stamp, "20240229T235959Z");
        assert_eq!(at(4_107_542_400).stamp, "21000301T000000Z");
        assert_eq!(at(0).stamp, "19700101T000000Z");
    }

    /// `get-vanilla` and `get-vanilla-query-order-key-case` of AWS's SigV4 test suite.
    #[test]
    fn the_sigv4_test_suite_get_requests_sign_as_published() {
        let c = creds(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
        );
        let date = at(1_440_938_160);
        let sign = |url: &str| {
            authorization(
                "GET",
                &Url::parse(url).unwrap(),
                &[("X-Amz-Date", &date.stamp)],
                EMPTY_SHA256,
                &c,
                "us-east-1",
                "service",
                &date,
            )
        };
        let auth = sign("https://example.amazonaws.com/");
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert_eq!(
            signature(&sign(
                "https://example.amazonaws.com/?Param2=value2&Param1=value1"
            )),
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        );
    }

    /// The GET Object (with `Range`) and ListObjects examples of S3's SigV4 documentation.
    #[test]
    fn the_s3_documentation_examples_sign_as_published() {
        let c = creds(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
        );
        let date = at(1_369_353_600);
        let base = [
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", date.stamp.as_str()),
        ];
        let url = Url::parse("https://examplebucket.s3.amazonaws.com/test.txt").unwrap();
        let mut headers = base.to_vec();
        headers.push(("Range", "bytes=0-9"));
        let auth = authorization(
            "GET",
            &url,
            &headers,
            EMPTY_SHA256,
            &c,
            "us-east-1",
            "s3",
            &date,
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        let url =
            Url::parse("https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J").unwrap();
        let auth = authorization(
            "GET",
            &url,
            &base,
            EMPTY_SHA256,
            &c,
            "us-east-1",
            "s3",
            &date,
        );
        assert_eq!(
            signature(&auth),
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
        );
    }

    /// Path-style addressing on a port, an escaped key, a session token and an escaped
    /// continuation token: expected values computed with the reference SDK signer (botocore).
    #[test]
    fn path_style_keys_ports_tokens_and_escaped_queries_sign_like_the_reference_sdk() {
        let key = "models/a b/été+x.safetensors";
        let url = Url::parse(&format!(
            "http://127.0.0.1:9000/my-bucket/{}",
            encode_path(key)
        ))
        .unwrap();
        assert_eq!(
            url.path(),
            "/my-bucket/models/a%20b/%C3%A9t%C3%A9%2Bx.safetensors"
        );
        let c = creds(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            Some("tok/en+="),
        );
        let now = UNIX_EPOCH + Duration::from_secs(1_369_353_600);
        let headers = s3_get_headers(&url, &c, "eu-west-1", now);
        let auth = &headers
            .iter()
            .find(|(k, _)| *k == "authorization")
            .unwrap()
            .1;
        assert!(
            auth.contains(
                "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"
            ),
            "{auth}"
        );
        assert_eq!(
            signature(auth),
            "000365256538a020a30313536f7ba9fd6f8e7e8cb23b07ccb96a69363e4a82a6"
        );
        assert!(
            headers
                .iter()
                .any(|(k, v)| *k == "x-amz-security-token" && v == "tok/en+=")
        );

        let url = Url::parse(&format!(
            "http://127.0.0.1:9000/my-bucket?list-type=2&prefix={}&continuation-token={}&encoding-type=url",
            encode("models/v+1/"),
            encode("1/ab+=")
        ))
        .unwrap();
        let c = Credentials {
            session_token: None,
            ..c
        };
        let headers = s3_get_headers(&url, &c, "eu-west-1", now);
        let auth = &headers
            .iter()
            .find(|(k, _)| *k == "authorization")
            .unwrap()
            .1;
        assert_eq!(
            signature(auth),
            "cf667505f3dc481c29aabe89a2487e9b97e79b651d979fb1b5cb8dc905c519ab"
        );
    }

    #[test]
    fn debug_output_never_shows_the_secret_or_the_token() {
        let c = creds("AKIDEXAMPLE", "very-secret", Some("session-secret"));
        let shown = format!("{c:?}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("session-secret"),
            "{shown}"
        );
    }
}
