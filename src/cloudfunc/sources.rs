//! Where `watermark_image` URLs are read from: objects of the configured
//! store when the URL names one, otherwise allow-listed http(s) hosts only.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Url;

use crate::store::{Body, Kept, ObjectStore, ReadBody};

/// How watermark URLs may be fetched.
/// The default cap on a watermark image, fetched or read: 10 MiB.
pub const MAX_WATERMARK_BYTES: usize = 10 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Hosts (exact, lowercase) whose http(s) URLs may be fetched.
    pub allow_hosts: Vec<String>,
    /// Allow fetching from loopback, private and link-local addresses.
    pub allow_private: bool,
    /// Largest watermark fetched over http(s), in bytes.
    pub max_bytes: usize,
    pub timeout: Duration,
    /// How long a fetched watermark is used before it is fetched again
    /// (zero: every invocation fetches its own).
    pub cache_ttl: Duration,
    /// The S3 endpoint in use: its own URLs (path style) name store objects.
    pub s3_endpoint: Option<String>,
    /// URL prefixes of this server (e.g. `http://127.0.0.1:8080`): their
    /// `/<bucket>/<key>` URLs name store objects.
    pub self_urls: Vec<String>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            allow_hosts: Vec::new(),
            allow_private: false,
            max_bytes: MAX_WATERMARK_BYTES,
            timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(60),
            s3_endpoint: None,
            self_urls: Vec::new(),
        }
    }
}

/// Resolves watermark URLs.
///
/// Fetched watermarks are kept for [`SourceConfig::cache_ttl`], and one
/// fetch of a URL serves every invocation that asks for it meanwhile: a
/// burst of events with the same logo fetches it once, and an unreachable
/// host costs one timeout for all of them, not one each. A failure is
/// kept for [`FAILURE_TTL`] only, so a logo uploaded after a miss is found
/// within that time.
pub struct WatermarkSources {
    config: SourceConfig,
    cache: Mutex<HashMap<String, Entry>>,
}

/// How long a failed fetch is reported again without trying again.
pub const FAILURE_TTL: Duration = Duration::from_secs(2);

/// Watermarks kept at most, and their bytes at most: rules name a few
/// logos; an action naming many distinct URLs refetches them.
const MAX_ENTRIES: usize = 32;
const MAX_CACHED_BYTES: usize = 64 << 20;

/// A finished fetch of one URL: when it finished, and its outcome.
type Fetched = (Instant, Result<Arc<[u8]>, FetchError>);

/// Why a watermark could not be read, and whether that may pass (a store
/// or host that failed or did not answer in time, rather than a missing
/// object, a refusal or a URL that names nothing readable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    pub message: String,
    pub transient: bool,
}

impl FetchError {
    fn passing(message: String) -> FetchError {
        FetchError {
            message,
            transient: true,
        }
    }
}

/// A lasting failure.
impl From<String> for FetchError {
    fn from(message: String) -> FetchError {
        FetchError {
            message,
            transient: false,
        }
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

struct Entry {
    started: Instant,
    /// Empty while the fetch is under way.
    cell: Arc<tokio::sync::OnceCell<Fetched>>,
}

impl Entry {
    /// Whether this entry's outcome may still be used `now`. A fetch under
    /// way is joined: it ends within the fetch timeout.
    fn fresh(&self, now: Instant, ttl: Duration) -> bool {
        match self.cell.get() {
            None => true,
            Some((at, Ok(_))) => now.saturating_duration_since(*at) < ttl,
            Some((at, Err(_))) => now.saturating_duration_since(*at) < FAILURE_TTL.min(ttl),
        }
    }

    fn bytes(&self) -> usize {
        match self.cell.get() {
            Some((_, Ok(bytes))) => bytes.len(),
            _ => 0,
        }
    }
}

/// Drops what is no longer fresh, then the oldest entries (finished or
/// not: their callers hold their own handle on the fetch) until `room`
/// more entries fit within the limits.
fn trim(cache: &mut HashMap<String, Entry>, now: Instant, ttl: Duration, room: usize) {
    cache.retain(|_, e| e.fresh(now, ttl));
    while cache.len() + room > MAX_ENTRIES
        || cache.values().map(Entry::bytes).sum::<usize>() > MAX_CACHED_BYTES
    {
        let Some(oldest) = cache
            .iter()
            .min_by_key(|(_, e)| e.started)
            .map(|(url, _)| url.clone())
        else {
            break;
        };
        cache.remove(&oldest);
    }
}

/// What a URL names.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    Object { bucket: String, key: String },
    Remote(Url),
}

impl WatermarkSources {
    pub fn new(config: SourceConfig) -> WatermarkSources {
        WatermarkSources {
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Drops what the cache holds for the store object `bucket/key` (under
    /// any URL naming it): the object was just written or deleted through
    /// this server, so a logo replaced, or uploaded after a failed read,
    /// shows at the next invocation instead of after the cache's time.
    pub fn forget_object(&self, bucket: &str, key: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|url, _| {
            !matches!(
                self.classify(url),
                Ok(Source::Object { bucket: b, key: k }) if b == bucket && k == key
            )
        });
    }

    /// The watermark behind `url` if the cache has a fresh outcome for it
    /// (bytes or a recent failure), without waiting for anything.
    pub fn cached(&self, url: &str) -> Option<Result<Arc<[u8]>, FetchError>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get(url)?;
        let (_, fetched) = entry.cell.get()?;
        entry
            .fresh(Instant::now(), self.config.cache_ttl)
            .then(|| fetched.clone())
    }

    /// Reads the watermark behind `url`, or takes it from the cache; the
    /// error says why it cannot be read. A read takes at most the fetch
    /// timeout, from the store too.
    pub async fn fetch(&self, store: &dyn ObjectStore, url: &str) -> Result<Arc<[u8]>, FetchError> {
        let ttl = self.config.cache_ttl;
        if ttl.is_zero() {
            return self.fetch_timed(store, url).await;
        }
        let cell = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            match cache.get(url) {
                Some(entry) if entry.fresh(now, ttl) => Arc::clone(&entry.cell),
                _ => {
                    trim(&mut cache, now, ttl, 1);
                    let cell = Arc::new(tokio::sync::OnceCell::new());
                    let entry = Entry {
                        started: now,
                        cell: Arc::clone(&cell),
                    };
                    cache.insert(url.to_string(), entry);
                    cell
                }
            }
        };
        // A caller that goes away mid-fetch leaves the cell empty, and the
        // next one waiting fetches.
        let (_, fetched) = cell
            .get_or_init(|| async {
                let fetched = self.fetch_timed(store, url).await;
                (Instant::now(), fetched)
            })
            .await;
        let fetched = fetched.clone();
        // The new bytes count against the cache's limit.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        trim(&mut cache, Instant::now(), ttl, 0);
        fetched
    }

    async fn fetch_timed(
        &self,
        store: &dyn ObjectStore,
        url: &str,
    ) -> Result<Arc<[u8]>, FetchError> {
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, self.fetch_now(store, url)).await {
            Ok(fetched) => fetched.map(Arc::from),
            Err(_) => Err(FetchError::passing(format!(
                "reading {url} took longer than {timeout:?}"
            ))),
        }
    }

    /// Reads the watermark behind `url`, past the cache.
    async fn fetch_now(&self, store: &dyn ObjectStore, url: &str) -> Result<Vec<u8>, FetchError> {
        match self.classify(url)? {
            Source::Object { bucket, key } => {
                // The same cap as a download, checked before reading.
                let limit = self.config.max_bytes;
                let read: ReadBody = Box::new(move |meta, body| {
                    if meta.size > limit as u64 {
                        return Ok(None);
                    }
                    Ok(Some(Kept::Bytes(match body {
                        Body::Bytes(bytes) => bytes,
                        body => {
                            let mut bytes = Vec::new();
                            body.into_reader()
                                .take((limit as u64).saturating_add(1))
                                .read_to_end(&mut bytes)?;
                            bytes.into()
                        }
                    })))
                });
                let (meta, bytes) =
                    store
                        .open_with(&bucket, &key, read)
                        .await
                        .map_err(|e| FetchError {
                            message: e.to_string(),
                            transient: e.is_transient(),
                        })?;
                match bytes {
                    Some(Kept::Bytes(bytes)) if bytes.len() <= limit => Ok(bytes.to_vec()),
                    _ => Err(format!(
                        "{bucket}/{key} is {} bytes, over the {limit}-byte watermark cap",
                        meta.size
                    )
                    .into()),
                }
            }
            Source::Remote(url) => self.fetch_remote(url).await,
        }
    }

    /// Decides what `url` names, without any I/O.
    pub fn classify(&self, raw: &str) -> Result<Source, String> {
        let url = Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        let path_object = |url: &Url| -> Result<Source, String> {
            let path = percent_decode(url.path().trim_start_matches('/'));
            let (bucket, key) = path
                .split_once('/')
                .filter(|(b, k)| !b.is_empty() && !k.is_empty())
                .ok_or_else(|| format!("{raw} does not name /<bucket>/<key>"))?;
            Ok(Source::Object {
                bucket: bucket.to_string(),
                key: key.to_string(),
            })
        };
        match url.scheme() {
            "s3" => {
                let (bucket, key) = s3_object(&url, raw)?;
                return Ok(Source::Object { bucket, key });
            }
            "http" | "https" => {}
            other => {
                return Err(format!(
                    "scheme {other} is not supported; use s3, http or https"
                ));
            }
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let own = self
            .config
            .s3_endpoint
            .iter()
            .chain(self.config.self_urls.iter())
            .filter_map(|u| Url::parse(u).ok())
            .any(|u| {
                u.host_str() == url.host_str()
                    && u.port_or_known_default() == url.port_or_known_default()
            });
        if own {
            return path_object(&url);
        }
        if let Some(rest) = host.strip_suffix(".qingstor.com") {
            // <bucket>.<zone>.qingstor.com/<key> or <zone>.qingstor.com/<bucket>/<key>
            return match rest.split_once('.') {
                Some((bucket, _zone)) => Ok(Source::Object {
                    bucket: bucket.to_string(),
                    key: percent_decode(url.path().trim_start_matches('/')),
                }),
                None => path_object(&url),
            };
        }
        if self
            .config
            .allow_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&host))
        {
            // An address written in the URL is judged here, so that a rule
            // naming one that every fetch would refuse is refused when set.
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = literal.parse::<IpAddr>()
                && !self.config.allow_private
                && !is_public(ip)
            {
                return Err(format!(
                    "{ip} is a private, loopback or link-local address \
                     (--watermark-allow-private allows it)"
                ));
            }
            return Ok(Source::Remote(url));
        }
        Err(format!(
            "host {host} is not on the watermark allow-list (--watermark-hosts)"
        ))
    }

    async fn fetch_remote(&self, url: Url) -> Result<Vec<u8>, FetchError> {
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        // An address in the URL (`[::1]` for IPv6) is used as it is.
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&host)
            .parse::<IpAddr>();
        let addrs: Vec<SocketAddr> = match literal {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            // The lookup counts against the fetch's time like the request.
            Err(_) => tokio::time::timeout(
                self.config.timeout,
                tokio::net::lookup_host((host.as_str(), port)),
            )
            .await
            .map_err(|_| {
                FetchError::passing(format!(
                    "cannot resolve {host} within {:?}",
                    self.config.timeout
                ))
            })?
            // The host is on the allow-list: a name that does not resolve
            // is most often the resolver's passing failure.
            .map_err(|e| FetchError::passing(format!("cannot resolve {host}: {e}")))?
            .collect(),
        };
        let addr = addrs
            .iter()
            .copied()
            .find(|a| self.config.allow_private || is_public(a.ip()))
            .ok_or_else(|| {
                format!("{host} resolves only to private, loopback or link-local addresses")
            })?;
        // Pin the checked address so a second lookup cannot swap it, and
        // connect to it directly: a proxy from the environment would look
        // the name up again, past the check.
        let client = reqwest::Client::builder()
            .timeout(self.config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .resolve(&host, addr)
            .build()
            .map_err(|e| e.to_string())?;
        // No answer (in time), or the host's own failure, may pass.
        let mut response = client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| FetchError::passing(format!("GET {url}: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError {
                message: format!("GET {url}: status {status}"),
                transient: status.is_server_error()
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
            });
        }
        let limit = self.config.max_bytes;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::passing(format!("GET {url}: {e}")))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > limit {
                return Err(
                    format!("GET {url}: larger than the {limit}-byte watermark cap").into(),
                );
            }
        }
        Ok(body)
    }
}

/// The object an `s3://<bucket>/<key>` URL names (the key percent-decoded),
/// as `serve` reads it; `imgfunc process` reads the same object from its
/// store folder.
pub fn s3_url_object(raw: &str) -> Result<(String, String), String> {
    let url = Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
    s3_object(&url, raw)
}

/// [`s3_url_object`] for a parsed URL, `raw` as the caller gave it.
fn s3_object(url: &Url, raw: &str) -> Result<(String, String), String> {
    let bucket = url.host_str().unwrap_or_default().to_string();
    let key = percent_decode(url.path().trim_start_matches('/'));
    if url.scheme() != "s3" || bucket.is_empty() || key.is_empty() {
        return Err(format!("{raw} does not name s3://<bucket>/<key>"));
    }
    Ok((bucket, key))
}

/// An entry of the watermark allow-list as [`SourceConfig::allow_hosts`]
/// holds it (lowercase; an IPv6 address in brackets, as URLs give it), or
/// why it cannot be one: a host name or address, without scheme or port.
pub fn allow_list_entry(entry: &str) -> Result<String, String> {
    let host = entry.trim().to_ascii_lowercase();
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if let Ok(ip) = bare.unwrap_or(&host).parse::<std::net::Ipv6Addr>() {
        // Spelled as URLs spell it, which is not always Rust's spelling
        // (`::ffff:1.2.3.4` is `[::ffff:102:304]` in a URL).
        let url = Url::parse(&format!("http://[{ip}]/")).ok();
        return Ok(url
            .as_ref()
            .and_then(Url::host_str)
            .map_or_else(|| format!("[{ip}]"), str::to_string));
    }
    // A wildcard would be taken as a name that matches nothing.
    let plain = !host.is_empty() && !host.contains([':', '/', '@', '?', '#', '\\', '*']);
    // As URLs spell it: an internationalised name in its ASCII form.
    let parsed = Url::parse(&format!("http://{host}/")).ok();
    match parsed.as_ref().and_then(Url::host_str) {
        Some(name) if plain => Ok(name.to_string()),
        _ => Err(format!(
            "watermark host `{}` is not a host name or address (no scheme, port or path)",
            entry.trim()
        )),
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// True for addresses on the public internet.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast() // 224/4: not one host's address
                || a == 0 // "this network", 0.0.0.0/8
                || a == 100 && (b & 0xc0) == 64 // shared (CGNAT), 100.64/10
                || a == 198 && (b & 0xfe) == 18 // benchmarking, 198.18/15
                || a == 192 && b == 0 && v4.octets()[2] == 0 // protocol assignments, 192.0.0/24
                || a >= 240) // reserved and broadcast, 240/4
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let o = v6.octets();
            // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last
            // bits, 6to4 (2002::/16) the one in bits 16-47; local-use NAT64
            // (64:ff9b:1::/48) reaches whatever its operator chose.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(IpAddr::V4([o[12], o[13], o[14], o[15]].into()));
            }
            if s[0] == 0x2002 {
                return is_public(IpAddr::V4([o[2], o[3], o[4], o[5]].into()));
            }
            if s[..3] == [0x64, 0xff9b, 1] {
                return false;
            }
            // IPv4-compatible (::a.b.c.d, deprecated): the IPv4 address in
            // its last bits, as some stacks still route it.
            if s[..6] == [0; 6] && !(v6.is_loopback() || v6.is_unspecified()) {
                return is_public(IpAddr::V4([o[12], o[13], o[14], o[15]].into()));
            }
            let seg = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast() // ff00::/8
                || (seg & 0xfe00) == 0xfc00 // unique local, fc00::/7
                || (seg & 0xffc0) == 0xfe80 // link-local, fe80::/10
                || (seg & 0xffc0) == 0xfec0) // site-local (deprecated), fec0::/10
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> WatermarkSources {
        WatermarkSources::new(SourceConfig {
            allow_hosts: vec!["cdn.example.com".into()],
            s3_endpoint: Some("http://127.0.0.1:9000".into()),
            self_urls: vec!["http://127.0.0.1:8080".into()],
            ..SourceConfig::default()
        })
    }

    fn object(bucket: &str, key: &str) -> Source {
        Source::Object {
            bucket: bucket.into(),
            key: key.into(),
        }
    }

    #[test]
    fn store_urls_name_objects() {
        let s = sources();
        let cases = [
            ("s3://marks/logo.png", object("marks", "logo.png")),
            (
                "https://marks.pek3b.qingstor.com/a/logo.png",
                object("marks", "a/logo.png"),
            ),
            (
                "https://pek3b.qingstor.com/marks/logo%20x.png",
                object("marks", "logo x.png"),
            ),
            (
                "http://127.0.0.1:9000/marks/logo.png",
                object("marks", "logo.png"),
            ),
            (
                "http://127.0.0.1:8080/marks/l.png",
                object("marks", "l.png"),
            ),
        ];
        for (url, want) in cases {
            assert_eq!(s.classify(url).unwrap(), want, "{url}");
        }
        assert!(matches!(
            s.classify("https://cdn.example.com/x.png").unwrap(),
            Source::Remote(_)
        ));
    }

    #[test]
    fn other_hosts_and_schemes_are_refused() {
        let s = sources();
        for url in [
            "https://evil.example.org/x.png",
            "http://127.0.0.1:22/x",
            "http://169.254.169.254/latest/meta-data",
            "file:///etc/passwd",
            "not a url",
            "s3://bucket-only",
        ] {
            assert!(s.classify(url).is_err(), "{url}");
        }
    }

    #[test]
    fn private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "100.64.0.1",
            "0.1.2.3",
            "198.19.0.1",
            "240.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a00:1::1",
            "64:ff9b:1::808:808",
            "::7f00:1",
            "::a00:1",
            "fec0::1",
            "192.0.0.8",
            "224.0.0.1",
            "239.255.255.250",
            "ff02::1",
            "ff0e::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "2606:4700::1111",
            "198.20.0.1",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::808:808",
            "192.0.1.1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn store_watermarks_are_capped_like_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::LocalStore::new(dir.path().to_path_buf());
        for (key, size) in [("small.png", 1000), ("big.png", 1001)] {
            let opts = crate::store::PutOptions::with_content_type("image/png");
            let bytes = bytes::Bytes::from(vec![1u8; size]);
            store.put("marks", key, bytes, opts).await.unwrap();
        }
        let s = WatermarkSources::new(SourceConfig {
            max_bytes: 1000,
            ..SourceConfig::default()
        });
        assert_eq!(
            s.fetch(&store, "s3://marks/small.png").await.unwrap().len(),
            1000
        );
        let err = s.fetch(&store, "s3://marks/big.png").await.unwrap_err();
        assert_eq!(
            err.message,
            "marks/big.png is 1001 bytes, over the 1000-byte watermark cap"
        );
        assert!(!err.transient);
        // A missing object does not come by itself: not worth a retry.
        let err = s.fetch(&store, "s3://marks/none.png").await.unwrap_err();
        assert!(!err.transient, "{err}");
    }

    #[test]
    fn allow_list_entries_are_host_names_or_addresses() {
        assert_eq!(
            allow_list_entry(" CDN.example.com ").unwrap(),
            "cdn.example.com"
        );
        assert_eq!(allow_list_entry("192.0.2.7").unwrap(), "192.0.2.7");
        assert_eq!(allow_list_entry("2001:DB8::1").unwrap(), "[2001:db8::1]");
        assert_eq!(allow_list_entry("[2001:db8::1]").unwrap(), "[2001:db8::1]");
        // As a URL names it, or it would never match.
        let url = Url::parse("http://[::FFFF:192.0.2.7]/logo.png").unwrap();
        assert_eq!(url.host_str(), Some("[::ffff:c000:207]"));
        for entry in ["::ffff:192.0.2.7", "[::ffff:192.0.2.7]"] {
            assert_eq!(allow_list_entry(entry).unwrap(), "[::ffff:c000:207]");
        }
        assert_eq!(
            allow_list_entry("Bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        for bad in [
            "",
            " ",
            "cdn.example.com:8443",
            "https://cdn.example.com",
            "a/b",
            "a b",
            "*.example.com",
            "*",
        ] {
            let err = allow_list_entry(bad).unwrap_err();
            assert!(err.contains("no scheme, port or path"), "{bad:?}: {err}");
        }
        // An entry matches the URLs it names.
        for (entry, url) in [
            ("2001:db8::1", "http://[2001:db8::1]/m.png"),
            ("bücher.example", "https://BÜCHER.example/m.png"),
        ] {
            let s = WatermarkSources::new(SourceConfig {
                allow_hosts: vec![allow_list_entry(entry).unwrap()],
                ..SourceConfig::default()
            });
            assert!(
                matches!(s.classify(url), Ok(Source::Remote(_))),
                "{entry} {url}"
            );
        }
    }

    #[tokio::test]
    async fn an_allow_listed_ip_literal_is_fetched_from_that_address() {
        // Served by a real HTTP server on IPv6 loopback; before, the URL's
        // bracketed host was handed to the resolver and never fetched.
        let Ok(listener) = tokio::net::TcpListener::bind("[::1]:0").await else {
            eprintln!("no IPv6 loopback here; skipped");
            return;
        };
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/m.png", axum::routing::get(|| async { "mark" }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let s = WatermarkSources::new(SourceConfig {
            allow_hosts: vec![allow_list_entry("::1").unwrap()],
            allow_private: true,
            ..SourceConfig::default()
        });
        let store = crate::store::LocalStore::new(std::env::temp_dir());
        let url = format!("http://[::1]:{}/m.png", addr.port());
        assert_eq!(&*s.fetch(&store, &url).await.unwrap(), b"mark");
        server.abort();
    }

    #[test]
    fn an_allow_listed_private_address_in_the_url_is_refused_without_fetching() {
        // Judged from the URL alone, so that a rule naming one is refused
        // when it is set, not at every event.
        let hosts = [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "::1",
            "93.184.216.34",
        ];
        let sources = |allow_private| {
            WatermarkSources::new(SourceConfig {
                allow_hosts: hosts.iter().map(|h| allow_list_entry(h).unwrap()).collect(),
                allow_private,
                ..SourceConfig::default()
            })
        };
        for url in [
            "http://127.0.0.1:9000/m.png",
            "https://10.1.2.3/m.png",
            "http://169.254.169.254/latest/m.png",
            "http://[::1]/m.png",
        ] {
            let err = sources(false).classify(url).unwrap_err();
            assert!(err.contains("--watermark-allow-private"), "{url}: {err}");
            assert!(
                matches!(sources(true).classify(url), Ok(Source::Remote(_))),
                "{url}"
            );
        }
        let public = sources(false).classify("http://93.184.216.34/m.png");
        assert!(matches!(public, Ok(Source::Remote(_))), "{public:?}");
    }

    #[tokio::test]
    async fn allow_listed_loopback_is_still_refused_by_default() {
        let s = WatermarkSources::new(SourceConfig {
            allow_hosts: vec!["localhost".into()],
            ..SourceConfig::default()
        });
        let store = crate::store::LocalStore::new(std::env::temp_dir());
        let err = s
            .fetch(&store, "http://localhost:1/x.png")
            .await
            .unwrap_err();
        assert!(err.message.contains("private, loopback"), "{err}");
        assert!(!err.transient, "a refusal of ours");
    }

    /// A server on 127.0.0.1 for watermark tests: `/ok/{n}` answers
    /// `mark`, `/bad.png` 500, `/big/{n}` 9 MiB, `/gated/{n}` `mark` once
    /// `gate` has a permit (then leaves it for the next); `gets` counts
    /// the GETs of each.
    struct MarkServer {
        base: String,
        gets: Arc<[std::sync::atomic::AtomicUsize; 4]>,
        gate: Arc<tokio::sync::Semaphore>,
        server: tokio::task::JoinHandle<()>,
    }

    impl MarkServer {
        async fn start() -> MarkServer {
            use axum::routing::get;
            use std::sync::atomic::Ordering::SeqCst;
            let gets: Arc<[std::sync::atomic::AtomicUsize; 4]> = Arc::default();
            let gate = Arc::new(tokio::sync::Semaphore::new(0));
            let (g, s) = (gets.clone(), gate.clone());
            let app = axum::Router::new()
                .route(
                    "/ok/{n}",
                    get({
                        let g = g.clone();
                        move || async move {
                            g[0].fetch_add(1, SeqCst);
                            "mark"
                        }
                    }),
                )
                .route(
                    "/bad.png",
                    get({
                        let g = g.clone();
                        move || async move {
                            g[1].fetch_add(1, SeqCst);
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR
                        }
                    }),
                )
                .route(
                    "/big/{n}",
                    get({
                        let g = g.clone();
                        move || async move {
                            g[2].fetch_add(1, SeqCst);
                            vec![7u8; 9 << 20]
                        }
                    }),
                )
                .route(
                    "/gated/{n}",
                    get(move || {
                        let (g, s) = (g.clone(), s.clone());
                        async move {
                            g[3].fetch_add(1, SeqCst);
                            if let Ok(permit) = s.acquire().await {
                                permit.forget();
                                s.add_permits(1);
                            }
                            "mark"
                        }
                    }),
                );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let server = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            MarkServer {
                base,
                gets,
                gate,
                server,
            }
        }

        fn count(&self, route: usize) -> usize {
            self.gets[route].load(std::sync::atomic::Ordering::SeqCst)
        }

        /// Waits (up to 20 s) until `route` has had `n` GETs.
        async fn asked(&self, route: usize, n: usize) {
            let asked = async {
                while self.count(route) < n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(20), asked)
                .await
                .unwrap_or_else(|_| panic!("route {route} was not asked {n} times"));
        }

        fn sources(&self, ttl: Duration) -> Arc<WatermarkSources> {
            Arc::new(WatermarkSources::new(SourceConfig {
                allow_hosts: vec!["127.0.0.1".into()],
                allow_private: true,
                cache_ttl: ttl,
                ..SourceConfig::default()
            }))
        }
    }

    fn temp_store() -> Arc<crate::store::LocalStore> {
        Arc::new(crate::store::LocalStore::new(std::env::temp_dir()))
    }

    #[tokio::test]
    async fn fetched_watermarks_are_kept_for_their_time_and_failures_briefly() {
        let marks = MarkServer::start().await;
        let store = temp_store();
        let (ok, bad) = (
            format!("{}/ok/1", marks.base),
            format!("{}/bad.png", marks.base),
        );

        let kept = marks.sources(Duration::from_secs(60));
        assert!(kept.cached(&ok).is_none());
        for _ in 0..3 {
            assert_eq!(&*kept.fetch(store.as_ref(), &ok).await.unwrap(), b"mark");
        }
        assert_eq!(marks.count(0), 1);
        assert_eq!(&*kept.cached(&ok).unwrap().unwrap(), b"mark");
        for _ in 0..2 {
            let err = kept.fetch(store.as_ref(), &bad).await.unwrap_err();
            assert!(err.message.contains("status 500"), "{err}");
            assert!(err.transient, "the host's own failure may pass");
        }
        assert_eq!(marks.count(1), 1, "a failure is kept for {FAILURE_TTL:?}");
        assert!(kept.cached(&bad).unwrap().is_err());
        // A failure is tried again after FAILURE_TTL, not after the TTL.
        tokio::time::sleep(FAILURE_TTL + Duration::from_millis(200)).await;
        assert!(kept.cached(&bad).is_none());
        kept.fetch(store.as_ref(), &bad).await.unwrap_err();
        kept.fetch(store.as_ref(), &ok).await.unwrap();
        assert_eq!((marks.count(0), marks.count(1)), (1, 2));

        // Past its time an entry is fetched again.
        let short = marks.sources(Duration::from_millis(100));
        short.fetch(store.as_ref(), &ok).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(short.cached(&ok).is_none());
        short.fetch(store.as_ref(), &ok).await.unwrap();
        assert_eq!(marks.count(0), 3);

        // Zero keeps nothing.
        let none = marks.sources(Duration::ZERO);
        none.fetch(store.as_ref(), &ok).await.unwrap();
        none.fetch(store.as_ref(), &ok).await.unwrap();
        assert!(none.cached(&ok).is_none());
        assert_eq!(marks.count(0), 5);
        marks.server.abort();
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_entries_and_bytes() {
        let marks = MarkServer::start().await;
        let store = temp_store();
        let kept = marks.sources(Duration::from_secs(60));
        let cached_bytes = |s: &WatermarkSources| {
            let cache = s.cache.lock().unwrap();
            (cache.len(), cache.values().map(Entry::bytes).sum::<usize>())
        };
        // Finished entries: many distinct URLs, each served.
        for n in 0..(MAX_ENTRIES + 8) {
            let url = format!("{}/ok/{n}", marks.base);
            assert_eq!(&*kept.fetch(store.as_ref(), &url).await.unwrap(), b"mark");
        }
        assert!(cached_bytes(&kept).0 <= MAX_ENTRIES);
        // Bytes: eight 9 MiB watermarks are more than the cache keeps.
        for n in 0..8 {
            let url = format!("{}/big/{n}", marks.base);
            assert_eq!(
                kept.fetch(store.as_ref(), &url).await.unwrap().len(),
                9 << 20
            );
        }
        let (_, bytes) = cached_bytes(&kept);
        assert!(bytes <= MAX_CACHED_BYTES && bytes > 0, "{bytes} bytes kept");
        // Fetches under way count too.
        let waiting: Vec<_> = (0..(MAX_ENTRIES + 8))
            .map(|n| {
                let (s, store, url) = (
                    kept.clone(),
                    store.clone(),
                    format!("{}/gated/{n}", marks.base),
                );
                tokio::spawn(async move { s.fetch(store.as_ref(), &url).await })
            })
            .collect();
        marks.asked(3, MAX_ENTRIES + 8).await;
        assert!(cached_bytes(&kept).0 <= MAX_ENTRIES);
        marks.gate.add_permits(1);
        for task in waiting {
            assert_eq!(&*task.await.unwrap().unwrap(), b"mark");
        }
        marks.server.abort();
    }

    #[tokio::test]
    async fn a_fetch_whose_caller_went_away_is_taken_up_by_one_waiting() {
        let marks = MarkServer::start().await;
        let store = temp_store();
        let s = marks.sources(Duration::from_secs(60));
        let url = format!("{}/gated/1", marks.base);
        let fetch = || {
            let (s, store, url) = (s.clone(), store.clone(), url.clone());
            tokio::spawn(async move { s.fetch(store.as_ref(), &url).await })
        };
        let first = fetch();
        marks.asked(3, 1).await;
        // The second joins the first's fetch, then is left with it.
        let second = fetch();
        tokio::time::sleep(Duration::from_millis(100)).await;
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        marks.gate.add_permits(1);
        let got = tokio::time::timeout(Duration::from_secs(20), second)
            .await
            .expect("the waiting caller fetches instead")
            .unwrap()
            .unwrap();
        assert_eq!(&*got, b"mark");
        assert_eq!(marks.count(3), 2, "the first fetch went with its caller");
        marks.server.abort();
    }
}
