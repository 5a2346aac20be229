//! Runs every case in `fixtures/cases/` (see its README) against a host on
//! the embedded local store and against a host on an S3-protocol server.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::host::{Behaviour, QUIET, Receiver, TestHost, decoded, fixture, test_config};
use common::s3::{S3Server, start_s3};
use image::AnimationDecoder;
use imgfunc::store::{LocalStore, ObjectStore, PutOptions};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy)]
enum Backend {
    Local,
    S3,
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cases")
}

/// Every case, sorted by folder name.
fn load_cases() -> Vec<(String, Value)> {
    let mut cases: Vec<(String, Value)> = std::fs::read_dir(cases_dir())
        .expect("fixtures/cases")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .map(|dir| {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let file = dir.join("case.json");
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let case =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            (name, case)
        })
        .collect();
    cases.sort_by(|a, b| a.0.cmp(&b.0));
    cases
}

fn str_at<'a>(value: &'a Value, field: &str) -> Result<&'a str, String> {
    value[field]
        .as_str()
        .ok_or_else(|| format!("`{field}` must be a string in {value}"))
}

fn content_type_for(name: &str) -> &'static str {
    imgfunc::store::guess_content_type(name)
}

/// True when `actual` has every field of `expected` with a matching value:
/// objects compare field by field recursively, anything else must be equal.
fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(actual), Value::Object(expected)) => expected
            .iter()
            .all(|(k, v)| actual.get(k).is_some_and(|a| contains(a, v))),
        _ => actual == expected,
    }
}

/// Every bucket a case names, which an S3 server must have before it runs.
fn buckets(case: &Value) -> Result<BTreeSet<String>, String> {
    let mut names = BTreeSet::new();
    names.insert(str_at(&case["rule"], "bucket")?.to_string());
    for object in case["objects"].as_array().into_iter().flatten() {
        names.insert(str_at(object, "bucket")?.to_string());
    }
    for output in case["expect"]["outputs"].as_array().into_iter().flatten() {
        names.insert(str_at(output, "bucket")?.to_string());
    }
    Ok(names)
}

/// The rule file with every `notify_url` pointing at `receiver`.
fn rule_file(case: &Value, receiver: &str) -> Result<Value, String> {
    let mut rule = case["rule"].clone();
    let notifications = rule["notifications"]
        .as_array_mut()
        .ok_or("`rule.notifications` must be a list")?;
    for notification in notifications {
        notification["notify_url"] = json!(receiver);
    }
    Ok(rule)
}

async fn run_case(name: &str, case: &Value, backend: Backend) -> Result<(), String> {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data_dir = dir.path().join("data");
    let functions_dir = dir.path().join("functions");
    std::fs::create_dir_all(&functions_dir).map_err(|e| e.to_string())?;
    let rule = rule_file(case, &receiver.url)?;
    std::fs::write(
        functions_dir.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&rule).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;

    let mut config = test_config(&data_dir);
    config.functions_dir = Some(functions_dir);
    let _s3: Option<S3Server>;
    let store: Arc<dyn ObjectStore> = match backend {
        Backend::Local => {
            _s3 = None;
            Arc::new(LocalStore::new(data_dir.clone()))
        }
        Backend::S3 => {
            let s3 = start_s3().await;
            for bucket in buckets(case)? {
                s3.create_bucket(&bucket).await;
            }
            config.embedded = false;
            let store = Arc::new(s3.store());
            _s3 = Some(s3);
            store
        }
    };
    for object in case["objects"].as_array().into_iter().flatten() {
        let file = str_at(object, "file")?;
        let content_type = object["content_type"]
            .as_str()
            .unwrap_or_else(|| content_type_for(file));
        store
            .put(
                str_at(object, "bucket")?,
                str_at(object, "key")?,
                Bytes::from(fixture(file)),
                PutOptions::with_content_type(content_type),
            )
            .await
            .map_err(|e| format!("storing {object}: {e}"))?;
    }

    let host = TestHost::start(config, store.clone()).await;
    let result = check(&host, &receiver, store.as_ref(), case).await;
    host.stop().await;
    result
}

/// Posts the case's event and checks the answer, the notifications and the
/// objects written.
async fn check(
    host: &TestHost,
    receiver: &Receiver,
    store: &dyn ObjectStore,
    case: &Value,
) -> Result<(), String> {
    let expect = &case["expect"];
    let response = host.post_events(&case["event"]).await;
    let status = response.status();
    let accepted: Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 202 {
        return Err(format!("POST /v1/events answered {status}: {accepted}"));
    }
    for field in ["unmatched", "skipped"] {
        if let Some(want) = expect.get(field)
            && &accepted[field] != want
        {
            return Err(format!("{field} is {}, expected {want}", accepted[field]));
        }
    }
    let ids: Vec<String> = accepted["invocations"]
        .as_array()
        .ok_or("no invocations in the answer")?
        .iter()
        .map(|i| i["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let want_invocations = expect["invocations"].as_u64().unwrap_or(1) as usize;
    if ids.len() != want_invocations {
        return Err(format!(
            "{} invocation(s), expected {want_invocations}: {accepted}",
            ids.len()
        ));
    }
    if ids.is_empty() {
        tokio::time::sleep(QUIET).await;
    }
    let payloads = receiver.wait_for_invocations(&ids).await;

    if let Some(want) = expect.get("notify") {
        for payload in &payloads {
            if !contains(payload, want) {
                return Err(format!("notification {payload} does not contain {want}"));
            }
        }
    }
    for other in receiver.bodies() {
        let ours = ids.iter().any(|id| other["invocation_id"] == id.as_str());
        if !ours && other["status"] != "skipped" {
            return Err(format!("unexpected notification {other}"));
        }
    }

    let reported: Vec<&Value> = payloads
        .iter()
        .flat_map(|p| p["outputs"].as_array().into_iter().flatten())
        .collect();
    let expected = expect["outputs"]
        .as_array()
        .ok_or("`expect.outputs` must be a list")?;
    let keys = |values: &[&Value]| -> BTreeSet<(String, String)> {
        values
            .iter()
            .map(|v| (v["bucket"].to_string(), v["key"].to_string()))
            .collect()
    };
    if keys(&reported) != keys(&expected.iter().collect::<Vec<_>>())
        || reported.len() != expected.len()
    {
        return Err(format!(
            "outputs reported {reported:?}, expected {expected:?}"
        ));
    }
    for want in expected {
        check_output(store, want, &reported).await?;
    }
    Ok(())
}

/// Reads one expected output back from the store and compares it with the
/// expectation and with what the notification reported.
async fn check_output(
    store: &dyn ObjectStore,
    want: &Value,
    reported: &[&Value],
) -> Result<(), String> {
    let (bucket, key) = (str_at(want, "bucket")?, str_at(want, "key")?);
    let object = store
        .get(bucket, key)
        .await
        .map_err(|e| format!("reading {bucket}/{key}: {e}"))?;
    let report = reported
        .iter()
        .find(|r| r["bucket"] == bucket && r["key"] == key)
        .ok_or_else(|| format!("{bucket}/{key} not reported"))?;
    let (format, width, height) = decoded(&object.bytes);
    let got = json!({"format": format, "width": width, "height": height});
    let want_shape =
        json!({"format": want["format"], "width": want["width"], "height": want["height"]});
    if got != want_shape {
        return Err(format!("{bucket}/{key} is {got}, expected {want_shape}"));
    }
    let content_type = content_type_for(&format!("x.{format}"));
    let as_reported = json!({
        "content_type": content_type,
        "bytes": object.bytes.len(),
        "width": width,
        "height": height,
    });
    if !contains(report, &as_reported) {
        return Err(format!(
            "{bucket}/{key} was reported as {report}, stored as {as_reported}"
        ));
    }
    if object.meta.content_type != content_type {
        return Err(format!(
            "{bucket}/{key} is stored with content type {}, expected {content_type}",
            object.meta.content_type
        ));
    }
    if want["animated"] == true {
        let decoder = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(&object.bytes[..]))
            .map_err(|e| e.to_string())?;
        let frames = decoder.into_frames().count();
        if frames < 2 {
            return Err(format!(
                "{bucket}/{key} has {frames} frame(s), expected an animation"
            ));
        }
    }
    Ok(())
}

async fn run_all(backend: Backend) {
    let cases = load_cases();
    assert!(cases.len() >= 5, "only {} cases found", cases.len());
    let mut failures = Vec::new();
    for (name, case) in &cases {
        eprintln!("case {name} on {backend:?}");
        if let Err(e) = run_case(name, case, backend).await {
            failures.push(format!("{name} ({backend:?}): {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_on_the_local_store() {
    run_all(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_on_s3() {
    run_all(Backend::S3).await;
}
