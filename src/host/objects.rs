//! The object API (`PUT`, `GET`, `HEAD`, `DELETE /{bucket}/{key}`, listing),
//! QingStor's `?notification` rule API and the `?image&action=` process API.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::queue::{Job, Reservation, jobs_for};
use super::{ApiError, AppState, JsonBody, ObjectBody, detach, finish};
use crate::action::Action;
use crate::cloudfunc;
use crate::events::Event;
use crate::imaging::{self, ImagingError, NoWatermarks};
use crate::rules::EventType;
use crate::store::{self, ListPage, PutOptions, StoreError, validate_bucket, validate_key};

/// The query string's keys and values; a bare key such as `image` maps to "".
fn query(raw: &Option<String>) -> HashMap<String, String> {
    let raw = raw.as_deref().unwrap_or("");
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

/// The `action` of an `?image` request, given once. Its value is only
/// percent-decoded: a `+` stays a `+`, since an action holds no spaces and
/// a base64 text or colour often ends in `+` (QingStor's values carry no
/// padding), which form decoding would turn into a space and lose.
fn image_action(raw: &Option<String>) -> Result<Option<String>, ApiError> {
    let mut values = raw
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(k, _)| percent_encoding::percent_decode_str(k).decode_utf8_lossy() == "action")
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        });
    let action = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_action",
            "`action` is given more than once in ?image&action=...; give the whole pipeline in \
             one, its operations joined by `|`",
        ));
    }
    Ok(action)
}

fn check_bucket(bucket: &str) -> Result<(), ApiError> {
    validate_bucket(bucket).map_err(ApiError::from)
}

/// S3's sub-resources of buckets and objects (`?tagging`, `?acl`,
/// `?uploads`, ...), operations of their own that this API does not have,
/// and the listing parameters it does not take. Taken as the plain request
/// they would read or overwrite the object itself.
const S3_OPERATIONS: &[&str] = &[
    "accelerate",
    "acl",
    "analytics",
    "attributes",
    "continuation-token",
    "cors",
    "delete",
    "delimiter",
    "encoding-type",
    "encryption",
    "intelligent-tiering",
    "inventory",
    "legal-hold",
    "lifecycle",
    "location",
    "logging",
    "marker",
    "metrics",
    "object-lock",
    "ownershipControls",
    "partNumber",
    "policy",
    "policyStatus",
    "publicAccessBlock",
    "replication",
    "requestPayment",
    "restore",
    "retention",
    "select",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "versionId",
    "versioning",
    "versions",
    "website",
];

/// Which query keys a route takes besides its own.
#[derive(Clone, Copy)]
enum Others {
    /// Any but [`S3_OPERATIONS`]: a read, whose URL may carry a cache
    /// buster (`?v=2`) that changes nothing.
    Ignored,
    /// None but a signature's: a write, where a key not understood may
    /// have asked for another operation.
    Refused,
}

/// 501 `not_supported` for a query key that asks for something `route`
/// does not do: an S3 sub-resource anywhere (but the plain object's own
/// `partNumber=1` and `versionId=null`, which S3 SDKs ask for), a copy's
/// source given in the URL, or on a write any key but `own` and the ones
/// that carry no operation: any `x-` key (S3 ignores them; SDKs add
/// `x-id=PutObject`, and presigned URLs their `X-Amz-*` fields) and the
/// signature fields of AWS's older URLs and QingStor's, in any case.
/// `?tagging` on a `PUT` would otherwise store the tag document as the
/// object, and on a `DELETE` delete it.
fn refuse_operations(
    query: &HashMap<String, String>,
    route: &str,
    own: &[&str],
    others: Others,
) -> Result<(), ApiError> {
    let prefixed = |key: &str, prefix: &str| {
        key.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    let inert = |key: &str| {
        (prefixed(key, "x-") && !prefixed(key, "x-amz-copy-source"))
            || [
                "AWSAccessKeyId",
                "Signature",
                "Expires",
                "access_key_id",
                "signature",
                "expires",
            ]
            .iter()
            .any(|name| name.eq_ignore_ascii_case(key))
    };
    let refused = query.iter().find_map(|(key, value)| {
        let plain_object = matches!(
            (key.as_str(), value.as_str()),
            ("partNumber", "1") | ("versionId", "null")
        );
        let refused = !own.contains(&key.as_str())
            && (prefixed(key, "x-amz-copy-source")
                || match others {
                    Others::Ignored => S3_OPERATIONS.contains(&key.as_str()) && !plain_object,
                    Others::Refused => !inert(key),
                });
        refused.then_some(key)
    });
    match refused {
        Some(key) => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported",
            format!(
                "`?{}` is not supported on {route}: this API has no S3 sub-resources (tags, \
                 ACLs, multipart uploads, versions) and lists with ?prefix= and ?start-after= \
                 only; nothing was read or changed",
                crate::shown(key)
            ),
        )),
        None => Ok(()),
    }
}

/// A bucket route's bucket, held to the rule book's names for
/// `?notification` and to the store's otherwise: a bad name is a 400
/// before anything else is looked at.
fn check_any_bucket(bucket: &str, query: &HashMap<String, String>) -> Result<(), ApiError> {
    if query.contains_key("notification") {
        check_rules_bucket(bucket)
    } else {
        check_bucket(bucket)
    }
}

/// The bucket of a `?notification` request, held to the rule book's names:
/// a notifier rule takes any bucket an event may name (a rule file's
/// included), so its rules are read and removed under that name too. An
/// image rule is still held to the store's names when it is set.
fn check_rules_bucket(bucket: &str) -> Result<(), ApiError> {
    // The store's names are taken too (`_x`: no rule can be set there, but
    // asking for its rules gets the empty list, as for any bucket).
    if validate_bucket(bucket).is_ok() {
        return Ok(());
    }
    crate::rules::validate_bucket_name(bucket)
        .map_err(|e| ApiError::bad_request("invalid_bucket", e.to_string()))
}

/// `GET /{bucket}?notification` gives the rules; `GET /{bucket}` lists keys
/// (`?prefix=`).
pub async fn get_bucket(
    State(state): State<Arc<AppState>>,
    Path(bucket): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = query(&raw);
    check_any_bucket(&bucket, &q)?;
    refuse_operations(
        &q,
        "GET /{bucket}",
        &["notification", "prefix", "start-after"],
        Others::Ignored,
    )?;
    if q.contains_key("notification") {
        let body = state
            .rules
            .get_raw(&bucket)
            .unwrap_or_else(|| json!({"notifications": []}));
        return Ok(Json(body));
    }
    let prefix = q.get("prefix").map(String::as_str).unwrap_or("");
    let start_after = q.get("start-after").map(String::as_str).unwrap_or("");
    let page = match state.store.list_page(&bucket, prefix, start_after).await {
        Ok(page) => page,
        Err(e) if e.is_not_found() => ListPage {
            entries: Vec::new(),
            truncated: false,
        },
        Err(e) => return Err(e.into()),
    };
    let keys: Vec<Value> = page
        .entries
        .iter()
        .map(|e| {
            json!({
                "key": e.key,
                "size": e.size,
                "last_modified": e.last_modified
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
            })
        })
        .collect();
    let mut body = json!({"name": bucket, "prefix": prefix, "keys": keys,
                          "truncated": page.truncated});
    if page.truncated
        && let Some(last) = page.entries.last()
    {
        body["next_start_after"] = json!(last.key);
    }
    Ok(Json(body))
}

/// `PUT /{bucket}?notification` sets the bucket's rules (validated now, 400
/// naming the field); `PUT /{bucket}` alone creates nothing and succeeds,
/// since buckets exist as soon as an object is written.
pub async fn put_bucket(
    State(state): State<Arc<AppState>>,
    Path(bucket): Path<String>,
    RawQuery(raw): RawQuery,
    request: axum::extract::Request,
) -> Result<StatusCode, ApiError> {
    // Refused before the body is read, as an object's PUT is.
    let q = query(&raw);
    check_any_bucket(&bucket, &q)?;
    refuse_operations(&q, "PUT /{bucket}", &["notification"], Others::Refused)?;
    let JsonBody(body) =
        <JsonBody as axum::extract::FromRequest<_>>::from_request(request, &state).await?;
    if q.contains_key("notification") {
        let book = Arc::clone(&state);
        let name = bucket.clone();
        rules_io(move || book.rules.set(&name, &body)).await?;
        tracing::info!(%bucket, "notification rules set");
        return Ok(StatusCode::OK);
    }
    Ok(StatusCode::OK)
}

/// Runs a rule-book change, which writes and syncs the rules file, on the
/// blocking pool rather than an async worker; it runs to the end even if
/// the client goes away.
async fn rules_io<T: Send + 'static>(
    change: impl FnOnce() -> Result<T, crate::rules::RuleBookError> + Send + 'static,
) -> Result<T, ApiError> {
    finish(tokio::task::spawn_blocking(move || {
        change().map_err(ApiError::from)
    }))
    .await
}

/// `DELETE /{bucket}?notification` removes the bucket's rules.
pub async fn delete_bucket(
    State(state): State<Arc<AppState>>,
    Path(bucket): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<StatusCode, ApiError> {
    let q = query(&raw);
    check_any_bucket(&bucket, &q)?;
    refuse_operations(&q, "DELETE /{bucket}", &["notification"], Others::Refused)?;
    if q.contains_key("notification") {
        let book = Arc::clone(&state);
        rules_io(move || book.rules.delete(&bucket)).await?;
        return Ok(StatusCode::NO_CONTENT);
    }
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "not_supported",
        "deleting a bucket is not supported; delete its objects",
    ))
}

/// `Content-Disposition` of a processed image: shown in place, and saved
/// under the key's last part with the extension of the format made
/// (`a.jpg` through `format:t_webp` saves as `a.webp`, not as a `.jpg`
/// holding WebP). The name is given as UTF-8 (RFC 6266's `filename*`) and,
/// for older clients, as ASCII with `_` for the rest.
fn disposition(key: &str, format: imaging::ImageFormat) -> String {
    let name = key.rsplit('/').next().unwrap_or(key);
    let stem = match name.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => name,
    };
    let extension = match format {
        imaging::ImageFormat::Jpeg => "jpg",
        other => other.name(),
    };
    let name = format!("{stem}.{extension}");
    let ascii: String = name
        .chars()
        .map(|c| match c {
            ' '..='~' if c != '"' && c != '\\' => c,
            _ => '_',
        })
        .collect();
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    format!(
        "inline; filename=\"{ascii}\"; filename*=UTF-8''{}",
        percent_encoding::utf8_percent_encode(&name, KEEP)
    )
}

/// The jobs a change to the embedded store fires, with queue room reserved
/// for them before anything is changed: a full queue refuses the request
/// instead of losing its events.
fn reserve_events(state: &AppState, event: Event) -> Result<(Vec<Job>, Reservation), ApiError> {
    let jobs = if state.config.embedded {
        jobs_for(state, event)
    } else {
        Vec::new()
    };
    let reservation = state
        .queue
        .try_reserve(jobs.len())
        .map_err(ApiError::queue_refused)?;
    Ok((jobs, reservation))
}

/// `PUT /{bucket}/{key}` stores the body (content type and `x-amz-meta-*`
/// kept) and fires `create_object`. What the headers and the object as it
/// is can refuse is refused before the body is read: a client that waits
/// for `100 Continue` sends none of it, and none is held meanwhile.
pub async fn put_object(
    State(state): State<Arc<AppState>>,
    Path((bucket, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    check_bucket(&bucket)?;
    validate_key(&key)?;
    refuse_operations(&query(&raw), "PUT /{bucket}/{key}", &[], Others::Refused)?;
    refuse_aws_chunked(&headers)?;
    refuse_copy(&headers)?;
    let opts = put_options(&headers, &key)?;
    check_write_preconditions(&state, &bucket, &key, &headers, false).await?;
    let ObjectBody(body, share) =
        <ObjectBody as axum::extract::FromRequest<_>>::from_request(request, &state).await?;
    let mut event = Event::internal(EventType::CreateObject, &bucket, &key);
    event.size = Some(body.len() as u64);
    if let Some(digest) = headers.get("content-md5") {
        check_md5(digest, &body).await?;
    }
    check_checksums(&headers, &body).await?;
    // Again, now that the body is here: the object may have changed while
    // it came.
    check_write_preconditions(&state, &bucket, &key, &headers, false).await?;
    let (jobs, reservation) = reserve_events(&state, event)?;
    // The write and its event run to the end even if the client goes away
    // meanwhile: a stored object always fires its event.
    let etag = detach(&state.clone(), async move {
        let etag = state.runtime.put(&bucket, &key, body, opts).await?;
        // The body's memory is counted until it is stored.
        drop(share);
        reservation.send(jobs);
        Ok(etag)
    })
    .await?;
    let mut response = StatusCode::CREATED.into_response();
    // The tag a later GET gives, for a client's `If-Match` on its next
    // write.
    if let Some(tag) = etag.and_then(|tag| HeaderValue::from_str(&tag).ok()) {
        response.headers_mut().insert(header::ETAG, tag);
    }
    Ok(response)
}

/// S3 clients that sign each chunk (`Content-Encoding: aws-chunked`, a
/// `STREAMING-*` payload hash) frame the body with chunk headers and
/// signatures; stored as sent, the object would hold the framing.
fn refuse_aws_chunked(headers: &HeaderMap) -> Result<(), ApiError> {
    let chunked = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("aws-chunked"))
        || headers
            .get("x-amz-content-sha256")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("STREAMING-"));
    if chunked {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported",
            "aws-chunked uploads (signed or checksummed chunks) are not decoded; send the \
             body whole (an S3 SDK: turn off request checksums or chunked signing, or use \
             UNSIGNED-PAYLOAD)",
        ));
    }
    Ok(())
}

/// A PUT's S3 checksums against the body: each `x-amz-checksum-ALGORITHM`
/// (the body's CRC32, CRC32C, CRC64NVME, SHA-1 or SHA-256 in base64, as
/// S3 SDKs send by default) and a hex `x-amz-content-sha256`. A body
/// changed on the way is refused (400 `bad_digest`), as S3 refuses it,
/// and so is an algorithm S3 does not have (400 `invalid_digest`).
async fn check_checksums(headers: &HeaderMap, body: &bytes::Bytes) -> Result<(), ApiError> {
    use std::str::FromStr;
    const NAMES: &str = "crc32, crc32c, crc64nvme, sha1 or sha256";
    let invalid = |message: String| ApiError::bad_request("invalid_digest", message);
    // (the header, its algorithm, the checksum sent)
    let mut wanted = Vec::new();
    for (name, value) in headers {
        let Some(algorithm) = name.as_str().strip_prefix("x-amz-checksum-") else {
            continue;
        };
        // How a checksum is asked for, not a checksum.
        if matches!(algorithm, "algorithm" | "type" | "mode") {
            continue;
        }
        let known = ["crc32", "crc32c", "crc64nvme", "sha1", "sha256"].contains(&algorithm);
        let parsed = aws_smithy_checksums::ChecksumAlgorithm::from_str(algorithm)
            .ok()
            .filter(|_| known)
            .ok_or_else(|| {
                invalid(format!(
                    "{name}: {} is not a checksum S3 has; use {NAMES}",
                    crate::shown(algorithm)
                ))
            })?;
        let sent = base64_value(value)
            .ok_or_else(|| invalid(format!("{name} must be the body's {algorithm} in base64")))?;
        wanted.push((name.as_str().to_owned(), parsed, sent));
    }
    if let Some(hex) = headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        let sent = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| invalid("x-amz-content-sha256 must be hex".into()))?;
        wanted.push((
            "x-amz-content-sha256".into(),
            aws_smithy_checksums::ChecksumAlgorithm::Sha256,
            sent,
        ));
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let body = body.clone();
    let failed = tokio::task::spawn_blocking(move || {
        wanted.into_iter().find_map(|(name, algorithm, sent)| {
            let mut checksum = algorithm.into_impl();
            checksum.update(&body);
            (checksum.finalize()[..] != sent[..]).then_some(name)
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match failed {
        Some(name) => Err(ApiError::bad_request(
            "bad_digest",
            format!("{name} does not match the body received; nothing was stored"),
        )),
        None => Ok(()),
    }
}

/// S3's CopyObject is a PUT with `x-amz-copy-source` and no body; taken as
/// a plain PUT it would replace the object with nothing.
fn refuse_copy(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key("x-amz-copy-source") {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported",
            "x-amz-copy-source (a copy made by the server) is not supported; GET the object \
             and PUT its bytes; nothing was stored",
        ));
    }
    Ok(())
}

/// A header's value decoded from base64, as digests are sent.
fn base64_value(value: &HeaderValue) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = value.to_str().ok()?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
}

/// A PUT's `Content-MD5` (the body's MD5 in base64) against the body: a
/// body changed on the way is refused, as S3 refuses it.
async fn check_md5(digest: &HeaderValue, body: &bytes::Bytes) -> Result<(), ApiError> {
    let sent = base64_value(digest)
        .filter(|d| d.len() == 16)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_digest",
                "Content-MD5 must be the body's 16-byte MD5 in base64",
            )
        })?;
    let body = body.clone();
    let actual = tokio::task::spawn_blocking(move || {
        use md5::Digest;
        md5::Md5::digest(&body).to_vec()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    if sent != actual {
        return Err(ApiError::bad_request(
            "bad_digest",
            "Content-MD5 does not match the body received; nothing was stored",
        ));
    }
    Ok(())
}

/// A PUT's or DELETE's `If-Match`, `If-Unmodified-Since` and
/// `If-None-Match` against the object as it is just before the write
/// (checked, then written: not atomic against another writer of the same
/// key at the same moment). 412 `precondition_failed` when one fails.
async fn check_write_preconditions(
    state: &AppState,
    bucket: &str,
    key: &str,
    request: &HeaderMap,
    deleting: bool,
) -> Result<(), ApiError> {
    let conditional = [
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_UNMODIFIED_SINCE,
    ]
    .iter()
    .any(|h| request.contains_key(h));
    if !conditional {
        return Ok(());
    }
    let current = match state.store.head(bucket, key).await {
        Ok(meta) => Some(Validators::of(&meta)),
        // A DELETE in a missing bucket is a 404 with or without conditions
        // (a PUT makes the bucket).
        Err(e @ StoreError::NoSuchBucket { .. }) if deleting => return Err(e.into()),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    let none_match = header_list(request, header::IF_NONE_MATCH).is_some_and(|tags| {
        current.as_ref().is_some_and(|c| {
            tags.split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || c.etag_weakly_is(tag))
        })
    });
    if Validators::preconditions_fail(current.as_ref(), request) || none_match {
        return Err(precondition_failed(bucket, key));
    }
    Ok(())
}

fn precondition_failed(bucket: &str, key: &str) -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
        format!(
            "{}/{}: a condition of the request (If-Match, If-None-Match or \
             If-Unmodified-Since) does not hold for the object as it is",
            crate::shown(bucket),
            crate::shown(key)
        ),
    )
}

/// The content type and `x-amz-meta-*` fields of a PUT. A value that is not
/// printable ASCII, or a field given twice, is refused with its name rather
/// than dropped.
fn put_options(headers: &HeaderMap, key: &str) -> Result<PutOptions, ApiError> {
    let text = |name: &str, value: &header::HeaderValue| {
        value.to_str().map(str::to_string).map_err(|_| {
            ApiError::from(StoreError::InvalidMetadata {
                name: name.to_string(),
                reason: "the value must be printable ASCII".into(),
            })
        })
    };
    let content_type = match headers.get(header::CONTENT_TYPE) {
        Some(value) => text("content-type", value)?,
        // As MinIO does: an upload that names none (`curl -T`) is served
        // back with the type its key's extension says.
        None => crate::store::guess_content_type(key).to_string(),
    };
    let mut user_metadata = BTreeMap::new();
    for (name, value) in headers {
        let Some(field) = name.as_str().strip_prefix("x-amz-meta-") else {
            continue;
        };
        // imgfunc's own metadata (the loop guard's chain) is not the
        // client's to set.
        if field.starts_with("imgfunc-") {
            continue;
        }
        if user_metadata
            .insert(field.to_string(), text(name.as_str(), value)?)
            .is_some()
        {
            return Err(StoreError::InvalidMetadata {
                name: name.as_str().to_string(),
                reason: "given twice".into(),
            }
            .into());
        }
    }
    Ok(PutOptions {
        content_type,
        user_metadata,
    })
}

/// `DELETE /{bucket}/{key}` removes the object and fires `delete_object`.
pub async fn delete_object(
    State(state): State<Arc<AppState>>,
    Path((bucket, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    check_bucket(&bucket)?;
    validate_key(&key)?;
    refuse_operations(&query(&raw), "DELETE /{bucket}/{key}", &[], Others::Refused)?;
    check_write_preconditions(&state, &bucket, &key, &headers, true).await?;
    let (jobs, reservation) = reserve_events(
        &state,
        Event::internal(EventType::DeleteObject, &bucket, &key),
    )?;
    detach(&state.clone(), async move {
        state.runtime.delete(&bucket, &key).await?;
        reservation.send(jobs);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET`/`HEAD /{bucket}/{key}`; with `?image&action=...` the processed image
/// (or `info` JSON) instead of the stored bytes.
pub async fn get_object(
    State(state): State<Arc<AppState>>,
    Path((bucket, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    method: Method,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    check_bucket(&bucket)?;
    validate_key(&key)?;
    let q = query(&raw);
    refuse_operations(
        &q,
        "GET /{bucket}/{key}",
        &["image", "action"],
        Others::Ignored,
    )?;
    if q.contains_key("image") {
        let action = image_action(&raw)?;
        return process(&state, &bucket, &key, action.as_deref(), &request).await;
    }
    let object = if method == Method::HEAD {
        None
    } else {
        Some(state.store.open(&bucket, &key).await?)
    };
    let meta = match &object {
        Some(object) => object.meta.clone(),
        None => state.store.head(&bucket, &key).await?,
    };
    let validators = Validators::of(&meta);
    if Validators::preconditions_fail(Some(&validators), &request) {
        return Err(precondition_failed(&bucket, &key));
    }
    if validators.not_modified(&request) {
        return Ok(validators.not_modified_response());
    }
    let range = match validators.range(&request, meta.size) {
        Ok(range) => range,
        Err(()) => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "invalid_range",
                format!(
                    "the range asked for is not within the object's {} bytes",
                    meta.size
                ),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", meta.size)) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(response);
        }
    };
    let (start, length) = range.map_or((0, meta.size), |(first, last)| (first, last - first + 1));
    let body = match object.map(|o| o.body) {
        // HEAD: the headers a GET would have, range and all.
        None => Body::empty(),
        Some(body) => object_body(body, start, length, &bucket, &key)?,
    };
    let mut response = Response::new(body);
    set_object_headers(response.headers_mut(), &meta, length, &validators);
    if let Some((first, last)) = range {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let value = format!("bytes {first}-{last}/{}", meta.size);
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

/// `length` bytes of an object's `body` from byte `start`.
fn object_body(
    body: store::Body,
    start: u64,
    length: u64,
    bucket: &str,
    key: &str,
) -> Result<Body, ApiError> {
    Ok(match body {
        store::Body::Bytes(bytes) => {
            let end = usize::try_from(start + length)
                .unwrap_or(bytes.len())
                .min(bytes.len());
            let start = usize::try_from(start).unwrap_or(end).min(end);
            Body::from(bytes.slice(start..end))
        }
        store::Body::File(mut file) if start > 0 => {
            use std::io::{Read, Seek};
            let seek = file.seek(std::io::SeekFrom::Start(start));
            if let Err(e) = seek {
                return Err(StoreError::io("read", format!("{bucket}/{key}"), e).into());
            }
            stream_body(Box::new(file.take(length)))
        }
        body => stream_body(Box::new(std::io::Read::take(
            Skip {
                inner: body.into_reader(),
                skip: start,
            },
            length,
        ))),
    })
}

/// A reader that first drops `skip` bytes of `inner`: a range of a stream
/// that cannot seek.
struct Skip {
    inner: Box<dyn std::io::Read + Send>,
    skip: u64,
}

impl std::io::Read for Skip {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.skip > 0 {
            let skipped =
                std::io::copy(&mut (&mut self.inner).take(self.skip), &mut std::io::sink())?;
            if skipped < self.skip {
                return Ok(0);
            }
            self.skip = 0;
        }
        self.inner.read(buf)
    }
}

/// An object's validators: the store's ETag (S3's own; the local store's
/// from the file's inode, size and time), else one of the size and time, and
/// that time as `Last-Modified`.
struct Validators {
    etag: Option<String>,
    modified: Option<std::time::SystemTime>,
}

impl Validators {
    fn of(meta: &store::ObjectMeta) -> Validators {
        let since_epoch = meta
            .last_modified
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        Validators {
            etag: meta
                .etag
                .clone()
                .or_else(|| since_epoch.map(|d| format!("\"{:x}-{:x}\"", meta.size, d.as_nanos()))),
            modified: meta.last_modified,
        }
    }

    /// The time as an HTTP date; none for a time before 1970 or after 9999,
    /// which HTTP dates cannot hold (a file's time can be either).
    fn last_modified(&self) -> Option<String> {
        const YEAR_10000: u64 = 253_402_300_800;
        self.modified
            .filter(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .is_ok_and(|d| d.as_secs() < YEAR_10000)
            })
            .map(httpdate::fmt_http_date)
    }

    fn etag_is(&self, tag: &str) -> bool {
        self.etag.as_deref() == Some(tag)
    }

    /// RFC 9110's weak comparison: the tags equal once `W/` is dropped.
    fn etag_weakly_is(&self, tag: &str) -> bool {
        let opaque = |t: &str| t.trim_start_matches("W/").to_owned();
        self.etag
            .as_deref()
            .is_some_and(|etag| opaque(etag) == opaque(tag))
    }

    /// RFC 9110's first two preconditions on the object as it is (`None`:
    /// there is none): `If-Match` names no current tag (a weak tag never
    /// matches; `*` needs the object), or, without `If-Match`, the object
    /// changed after `If-Unmodified-Since`.
    fn preconditions_fail(current: Option<&Validators>, request: &HeaderMap) -> bool {
        if request.contains_key(header::IF_MATCH) {
            let Some(tags) = header_list(request, header::IF_MATCH) else {
                return true;
            };
            let Some(current) = current else {
                return true;
            };
            return !tags
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || (!tag.starts_with("W/") && current.etag_is(tag)));
        }
        let since = request
            .get(header::IF_UNMODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        match (since, current.and_then(|c| c.modified)) {
            (Some(since), Some(modified)) => unix_seconds(modified) > unix_seconds(since),
            _ => false,
        }
    }

    /// Whether a conditional GET or HEAD gets 304: `If-None-Match` naming
    /// the ETag (or `*`); without it, `If-Modified-Since` at or after the
    /// object's time (in whole seconds, as HTTP dates are).
    fn not_modified(&self, request: &HeaderMap) -> bool {
        if request.contains_key(header::IF_NONE_MATCH) {
            let Some(tags) = header_list(request, header::IF_NONE_MATCH) else {
                return false;
            };
            return tags
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || self.etag_weakly_is(tag));
        }
        let since = request
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        match (since, self.modified) {
            // A date in the future is ignored, as RFC 9110 asks.
            (Some(since), Some(modified)) if since <= std::time::SystemTime::now() => {
                unix_seconds(modified) <= unix_seconds(since)
            }
            _ => false,
        }
    }

    fn not_modified_response(&self) -> Response {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        self.set(response.headers_mut());
        response
    }

    fn set(&self, headers: &mut HeaderMap) {
        if let Some(v) = self
            .etag
            .as_deref()
            .and_then(|e| HeaderValue::from_str(e).ok())
        {
            headers.insert(header::ETAG, v);
        }
        if let Some(v) = self
            .last_modified()
            .and_then(|d| HeaderValue::from_str(&d).ok())
        {
            headers.insert(header::LAST_MODIFIED, v);
        }
    }

    /// The one byte range a `Range` header asks of `size` bytes, first and
    /// last inclusive: `bytes=A-B`, `bytes=A-` or `bytes=-N` (the unit in
    /// any case, the numbers decimal digits). `None` (the whole object, as
    /// RFC 9110 allows) without the header, for several ranges, a unit
    /// other than bytes or a syntax not understood, for a suffix of an
    /// empty object, or when `If-Range` does not name this version by its
    /// strong tag. `Err` when no byte of the object is in the range (416).
    fn range(&self, request: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
        let Some(spec) = request
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once('='))
            .filter(|(unit, _)| unit.trim().eq_ignore_ascii_case("bytes"))
            .map(|(_, spec)| spec.trim())
        else {
            return Ok(None);
        };
        if let Some(if_range) = request.get(header::IF_RANGE) {
            // Only a strong tag: a date (`Last-Modified`, to the second)
            // cannot tell two versions written in one second apart, and a
            // range of the newer spliced onto the older corrupts a resumed
            // download; the whole object is sent instead.
            let current = if_range.to_str().ok().is_some_and(|tag| {
                tag.starts_with('"') && self.etag.as_deref() == Some(tag.trim())
            });
            if !current {
                return Ok(None);
            }
        }
        if spec.contains(',') {
            return Ok(None);
        }
        let Some((first, last)) = spec.split_once('-') else {
            return Ok(None);
        };
        let (first, last) = (first.trim(), last.trim());
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u64>().ok())
                .flatten()
        };
        let range = match (first.is_empty(), number(first), number(last)) {
            // The last N bytes; of an empty object, none, which the whole
            // (empty) object gives.
            (true, _, Some(n)) if n > 0 => match size.checked_sub(1) {
                Some(end) => (size.saturating_sub(n), end),
                None => return Ok(None),
            },
            // `bytes=-0` asks for no byte at all.
            (true, _, Some(_)) => return Err(()),
            (false, Some(a), None) if last.is_empty() => (a, size.saturating_sub(1)),
            (false, Some(a), Some(b)) if a <= b => (a, b.min(size.saturating_sub(1))),
            _ => return Ok(None),
        };
        if range.0 >= size {
            return Err(());
        }
        Ok(Some(range))
    }
}

/// A list header's values, its lines joined as HTTP joins them; `None`
/// when it is absent or a line is not text.
fn header_list(request: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let lines: Option<Vec<&str>> = request
        .get_all(name)
        .iter()
        .map(|v| v.to_str().ok())
        .collect();
    lines
        .filter(|lines| !lines.is_empty())
        .map(|lines| lines.join(","))
}

/// Whole seconds since 1970, as HTTP dates count.
fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bytes read per chunk of a streamed GET.
const GET_CHUNK_BYTES: usize = 256 << 10;

/// A response body read from `read` a chunk at a time as the client takes
/// it, each read a short task on the blocking pool: an object of any size
/// holds about one chunk in memory, and a slow client holds no thread.
fn stream_body(read: Box<dyn std::io::Read + Send>) -> Body {
    let chunks = futures_util::stream::unfold(Some(read), |state| async move {
        let mut read = state?;
        let chunk = tokio::task::spawn_blocking(move || {
            let mut chunk = vec![0u8; GET_CHUNK_BYTES];
            loop {
                match read.read(&mut chunk) {
                    Ok(n) => {
                        chunk.truncate(n);
                        return (read, Ok(chunk));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return (read, Err(e)),
                }
            }
        })
        .await;
        match chunk {
            Ok((_, Ok(chunk))) if chunk.is_empty() => None,
            Ok((read, Ok(chunk))) => Some((Ok(bytes::Bytes::from(chunk)), Some(read))),
            // The client sees the connection end short of Content-Length.
            Ok((_, Err(e))) => Some((Err(e), None)),
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    Body::from_stream(chunks)
}

/// An object's headers, for a body of `length` bytes (the whole object's,
/// or a range's).
fn set_object_headers(
    headers: &mut HeaderMap,
    meta: &store::ObjectMeta,
    length: u64,
    validators: &Validators,
) {
    if let Ok(v) = HeaderValue::from_str(&meta.content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    validators.set(headers);
    for (k, v) in &meta.user_metadata {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(format!("x-amz-meta-{k}").as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(name, value);
        }
    }
}

/// A processed image's validators: a tag made from the source's tag, the
/// action, the limits and this build (whose sources and dependencies
/// `build.rs` hashes: another build's output may differ), and the later of
/// the source's time and this build's. A tag that matches was therefore
/// made by the same work on the same source, which succeeded then and
/// would again; an unchanged source answers 304 without being read or
/// processed again.
fn processed_validators(
    source: &store::ObjectMeta,
    action: &str,
    limits: &imaging::Limits,
) -> Validators {
    use md5::Digest;
    let of_source = Validators::of(source);
    let limits = format!(
        "{} {} {} {} {}",
        limits.max_input_bytes,
        limits.max_pixels,
        limits.max_output_side,
        limits.max_frames,
        limits.max_animation_pixels
    );
    let etag = of_source.etag.map(|tag| {
        let mut hash = md5::Md5::new();
        for part in [tag.as_str(), action, &limits, env!("IMGFUNC_BUILD_ID")] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        // Weak: the same pixels, not promised byte for byte elsewhere.
        format!("W/\"{hex}\"")
    });
    let built = env!("IMGFUNC_BUILD_TIME")
        .parse::<u64>()
        .ok()
        .map(|secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
    Validators {
        etag,
        // A source with no time an HTTP date can hold gives none: a later
        // change to it could not be told from the build's time.
        modified: of_source.modified.map(|source| match built {
            Some(built) if source >= std::time::UNIX_EPOCH => source.max(built),
            _ => source,
        }),
    }
}

async fn process(
    state: &Arc<AppState>,
    bucket: &str,
    key: &str,
    action: Option<&str>,
    request: &HeaderMap,
) -> Result<Response, ApiError> {
    let action = action.ok_or_else(|| {
        ApiError::bad_request("invalid_action", "missing `action` in ?image&action=...")
    })?;
    let action_text = action;
    let action = Action::parse(action)?;
    if action.ops.iter().any(|op| {
        matches!(
            op,
            crate::action::Op::Save(_) | crate::action::Op::WatermarkImage(_)
        )
    }) {
        return Err(ApiError::bad_request(
            "invalid_action",
            "save and watermark_image run in rules (cloudfunc image), not in ?image requests",
        ));
    }
    let max_age = state.config.image_max_age.as_secs();
    let cache = |headers: &mut HeaderMap, validators: &Validators| {
        validators.set(headers);
        let control = match max_age {
            0 => HeaderValue::from_static("no-cache"),
            secs => HeaderValue::try_from(format!("public, max-age={secs}"))
                .unwrap_or_else(|_| HeaderValue::from_static("no-cache")),
        };
        headers.insert(header::CACHE_CONTROL, control);
    };
    // A cache revalidating a tag it holds is answered from the source's
    // tag alone: a tag that matches names work that succeeded (see
    // [`processed_validators`]). Other conditions are judged once the image
    // is made, since a request that fails (a bad action, a source that is
    // not an image, lower limits) gets its error, not a 304 or 412 (RFC
    // 9110, 13.2.1).
    let revalidates = header_list(request, header::IF_NONE_MATCH)
        .is_some_and(|tags| !tags.split(',').any(|t| t.trim() == "*"));
    if revalidates {
        let source = state.store.head(bucket, key).await?;
        let validators = processed_validators(&source, action_text, &state.config.limits);
        if !Validators::preconditions_fail(Some(&validators), request)
            && validators.not_modified(request)
        {
            let mut response = StatusCode::NOT_MODIFIED.into_response();
            cache(response.headers_mut(), &validators);
            return Ok(response);
        }
    }
    // Like an invocation: a slot bounds the sources in memory at once, and
    // an object over the input limit is refused unread. The read and the
    // image work run in a task of their own that holds the slot: a client
    // that hangs up stops this handler, not a read under way (which cannot
    // be stopped), so the slot is kept until the work is done. Shutdown
    // waits for it as for other work requests hand off.
    // A turn first: it waits while a queued job runs alone.
    let turn = state.queue.shared_turn().await;
    let slot = state.runtime.image_slot().await;
    let limits = state.config.limits.clone();
    let (source_bucket, named) = (bucket.to_owned(), key.to_owned());
    let (bucket, key) = (bucket.to_owned(), key.to_owned());
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    let task = state.clone();
    let output = detach(state, async move {
        let _turn = turn;
        let (meta, input) =
            cloudfunc::read_source(&task.runtime, &bucket, &key, &action, |_| false).await?;
        // Left unread: over the input limit, refused before the image
        // threads are asked.
        let input = input.ok_or_else(|| ImagingError::input_too_large(meta.size, &limits))?;
        let (size, name) = (meta.size, format!("{bucket}/{key}"));
        let output = task
            .runtime
            .run_cpu(slot, move || -> Result<_, ApiError> {
                let input = cloudfunc::read_kept(input, size, &action, &limits, &name)?;
                Ok(imaging::process(&input, &action, &limits, &NoWatermarks)?)
            })
            .await
            .map_err(internal)??;
        Ok((meta, output))
    })
    .await?;
    let (meta, output) = output;
    // The tag of the source that was read.
    let validators = processed_validators(&meta, action_text, &state.config.limits);
    if Validators::preconditions_fail(Some(&validators), request) {
        return Err(precondition_failed(&source_bucket, &named));
    }
    if validators.not_modified(request) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        cache(response.headers_mut(), &validators);
        return Ok(response);
    }
    let mut response = match (output.image, output.info) {
        (Some(image), _) => {
            let length = image.bytes.len();
            let body = super::counted_body(state, image.bytes)?;
            let mut response = (
                [
                    (
                        header::CONTENT_TYPE,
                        image.format.content_type().to_string(),
                    ),
                    (header::CONTENT_LENGTH, length.to_string()),
                ],
                body,
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&disposition(&named, image.format)) {
                response
                    .headers_mut()
                    .insert(header::CONTENT_DISPOSITION, v);
            }
            response
        }
        (None, Some(info)) => Json(info).into_response(),
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "no output",
            ));
        }
    };
    cache(response.headers_mut(), &validators);
    Ok(response)
}
