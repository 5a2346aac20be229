//! The rules of every bucket, shared by the server's handlers.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde_json::{Value, json};
use thiserror::Error;

use super::error::RuleError;
use super::event_type::EventType;
use super::rule::Rule;
use super::validate::{notifications_from_body, rule_file_from_bytes, validate_bucket_name};

/// Why the rule book could not load or save rules.
#[derive(Debug, Error)]
pub enum RuleBookError {
    /// A rule set given to [`RuleBook::set`] (or a bucket name) was refused;
    /// the caller's mistake, a 400.
    #[error(transparent)]
    Invalid(#[from] RuleError),
    /// A rule file in `functions/` or the state directory was refused.
    #[error("{}: {source}", path.display())]
    InvalidFile { path: PathBuf, source: RuleError },
    /// Reading or writing a file failed; the server's problem, a 500.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The notification rules of every bucket.
///
/// Rules come from two places: deployable files in `functions/` (read at
/// start) and QingStor's `PUT /?notification` (through [`RuleBook::set`]).
/// A bucket's rules set through the API replace its file-loaded rules, and
/// with a state directory they are saved there as `<bucket>.json` (the body
/// as set) so that they survive a restart. Deleting saves an empty rule set,
/// so that a deleted bucket's file-loaded rules do not come back either.
#[derive(Debug, Default)]
pub struct RuleBook {
    state_dir: Option<PathBuf>,
    /// The store's check of bucket names (see [`RuleBook::open_for`]).
    bucket_check: Option<crate::store::BucketCheck>,
    /// The server's check of `watermark_image` URLs (see
    /// [`RuleBook::open_for`]).
    watermark_check: Option<WatermarkCheck>,
    /// The server's image limits: a resize that exceeds them for every
    /// source is refused (see [`RuleBook::open_for`]).
    limits: crate::imaging::Limits,
    buckets: RwLock<HashMap<String, BucketRules>>,
    /// Orders writes to the state directory with the updates they belong to.
    saving: Mutex<()>,
}

/// Says whether this server can read the image a `watermark_image` URL
/// names (a store object, or a host it may fetch from), without any I/O;
/// the error says why not.
#[derive(Clone)]
pub struct WatermarkCheck(Arc<UrlCheck>);

type UrlCheck = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl WatermarkCheck {
    pub fn new(check: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) -> Self {
        WatermarkCheck(Arc::new(check))
    }
}

impl std::fmt::Debug for WatermarkCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatermarkCheck")
    }
}

#[derive(Debug, Clone)]
struct BucketRules {
    rules: Vec<Arc<Rule>>,
    /// The notification body, for `GET /?notification`.
    raw: Value,
}

impl RuleBook {
    /// A rule book kept in memory only.
    pub fn new() -> RuleBook {
        RuleBook::default()
    }

    /// A rule book that saves API-set rules in `state_dir` (created if
    /// missing). Loads the files of `functions_dir` first, then the saved
    /// rules, which replace file-loaded ones bucket by bucket. Any invalid
    /// file is an error: rules are never dropped silently.
    pub fn open(state_dir: &Path, functions_dir: Option<&Path>) -> Result<RuleBook, RuleBookError> {
        RuleBook::open_for(
            state_dir,
            functions_dir,
            crate::store::validate_bucket,
            None,
            crate::imaging::Limits::default(),
        )
    }

    /// [`RuleBook::open`] for a store whose bucket names `bucket_check`
    /// accepts ([`crate::store::ObjectStore::bucket_check`]): rules set or
    /// loaded from `functions/` are refused when their bucket, `save_bucket`
    /// or a `save:` target is a name the store refuses, or when
    /// `watermark_check` refuses a `watermark_image` URL, or when a resize
    /// is over `limits` whatever its source, instead of failing at every
    /// event. (Rules saved earlier are loaded as they are.)
    pub fn open_for(
        state_dir: &Path,
        functions_dir: Option<&Path>,
        bucket_check: crate::store::BucketCheck,
        watermark_check: Option<WatermarkCheck>,
        limits: crate::imaging::Limits,
    ) -> Result<RuleBook, RuleBookError> {
        fs::create_dir_all(state_dir).map_err(|source| RuleBookError::Io {
            op: "create",
            path: state_dir.to_path_buf(),
            source,
        })?;
        let book = RuleBook {
            state_dir: Some(state_dir.to_path_buf()),
            bucket_check: Some(bucket_check),
            watermark_check,
            limits,
            ..RuleBook::default()
        };
        if let Some(dir) = functions_dir {
            book.load_dir(dir)?;
        }
        book.load_state(state_dir)?;
        Ok(book)
    }

    /// Loads every `*.json` rule file of `dir` (`{"bucket": ..,
    /// "notifications": [..]}`), replacing the rules of the buckets they name.
    /// Several files may name the same bucket; their rules are merged and
    /// their ids must be unique. Nothing changes unless every file is valid.
    /// Returns the number of rules loaded.
    pub fn load_dir(&self, dir: &Path) -> Result<usize, RuleBookError> {
        let mut loaded: HashMap<String, FileRules> = HashMap::new();
        for path in json_files(dir)? {
            let bytes = read(&path)?;
            let (bucket, items, rules) = rule_file_from_bytes(&bytes)
                .and_then(|(bucket, items, rules)| {
                    self.check_buckets(&bucket, &rules)?;
                    Ok((bucket, items, rules))
                })
                .map_err(|source| RuleBookError::InvalidFile {
                    path: path.clone(),
                    source,
                })?;
            let entry = loaded.entry(bucket.clone()).or_default();
            for (i, rule) in rules.into_iter().enumerate() {
                if let Some(first) = entry.origins.get(&rule.id) {
                    return Err(RuleBookError::InvalidFile {
                        path,
                        source: RuleError::new(
                            format!("notifications[{i}].id"),
                            format!(
                                "duplicate id `{}`: bucket `{bucket}` already has it from {}",
                                rule.id,
                                first.display()
                            ),
                        ),
                    });
                }
                entry.origins.insert(rule.id.clone(), path.clone());
                entry.rules.push(Arc::new(rule));
            }
            entry.items.extend(items);
        }
        // Files of one bucket together.
        for (bucket, file) in &loaded {
            super::validate::check_bucket_bounds(file.rules.iter().map(|r| &**r)).map_err(|e| {
                RuleBookError::InvalidFile {
                    path: dir.to_path_buf(),
                    source: e.renamed(format!("the files of bucket `{bucket}`")),
                }
            })?;
        }
        let count = loaded.values().map(|file| file.rules.len()).sum();
        let mut buckets = self.buckets.write().unwrap_or_else(PoisonError::into_inner);
        for (bucket, FileRules { items, rules, .. }) in loaded {
            tracing::info!(
                bucket,
                rules = rules.len(),
                "loaded rules from {}",
                dir.display()
            );
            let raw = json!({ "notifications": items });
            replace(&mut buckets, bucket, rules, raw);
        }
        Ok(count)
    }

    /// Validates a QingStor notification body and makes it the rules of
    /// `bucket`, replacing all its rules; saves it when there is a state
    /// directory. An empty `notifications` list removes the bucket's rules.
    pub fn set(&self, bucket: &str, body: &[u8]) -> Result<(), RuleBookError> {
        validate_bucket_name(bucket)?;
        let (raw, rules) = notifications_from_body(body, bucket)?;
        self.check_buckets(bucket, &rules)?;
        let rules = rules.into_iter().map(Arc::new).collect();
        self.save_then(bucket, &raw, |buckets| {
            replace(buckets, bucket.to_string(), rules, raw.clone());
        })
    }

    /// Holds the buckets the `image` rules among `rules` read and write
    /// (`bucket` itself, `save_bucket`, `save:` targets) to the store's
    /// bucket names, and their `watermark_image` URLs to the watermark
    /// check; the error names the field. Notifier rules do not touch
    /// the store, so they take any bucket name an event may carry.
    ///
    /// Also refuses more than [`super::validate::MAX_RULES_PER_BUCKET`]
    /// rules, text watermarks that would draw nothing, and image rules on
    /// events that leave no object
    /// ([`super::validate::check_image_events`]). Made when rules are set or
    /// read from `functions/`; rules saved earlier are loaded as they are.
    pub fn check_buckets(&self, bucket: &str, rules: &[Rule]) -> Result<(), RuleError> {
        super::validate::check_bucket_bounds(rules)?;
        super::validate::check_image_events(rules)?;
        let check = self.bucket_check.unwrap_or(crate::store::validate_bucket);
        if rules.iter().any(|rule| rule.image_args().is_some()) {
            check(bucket).map_err(|e| RuleError::new("bucket", e.to_string()))?;
        }
        for (i, rule) in rules.iter().enumerate() {
            let Some(args) = rule.image_args() else {
                continue;
            };
            if let Some(save_bucket) = &args.save_bucket {
                check(save_bucket).map_err(|e| {
                    RuleError::new(
                        format!("notifications[{i}].cloudfunc_args.save_bucket"),
                        e.to_string(),
                    )
                })?;
            }
            let field = || format!("notifications[{i}].cloudfunc_args.action");
            for op in &args.action.ops {
                match op {
                    crate::action::Op::Save(save) => check(&save.bucket)
                        .map_err(|e| RuleError::new(field(), format!("save: {e}")))?,
                    crate::action::Op::WatermarkImage(mark) => {
                        if let Some(WatermarkCheck(ok)) = &self.watermark_check {
                            ok(&mark.url).map_err(|e| {
                                RuleError::new(
                                    field(),
                                    format!("watermark_image: {}: {e}", crate::shown(&mark.url)),
                                )
                            })?;
                        }
                    }
                    crate::action::Op::Resize(resize) => {
                        if let Some(e) =
                            crate::imaging::resize_fails_for_every_source(resize, &self.limits)
                        {
                            return Err(RuleError::new(
                                field(),
                                format!("{e}, whatever the source"),
                            ));
                        }
                    }
                    crate::action::Op::Watermark(mark)
                        if !crate::imaging::watermark::draws_something(&mark.text) =>
                    {
                        return Err(RuleError::new(
                            field(),
                            format!("watermark: {}", crate::imaging::NO_MARK),
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The notification body of `bucket` as set (or as loaded from files),
    /// `None` when the bucket has no rules.
    pub fn get_raw(&self, bucket: &str) -> Option<Value> {
        self.read(|buckets| buckets.get(bucket).map(|b| b.raw.clone()))
    }

    /// Removes every rule of `bucket`, file-loaded ones included, and saves
    /// that. Returns whether the bucket had rules.
    pub fn delete(&self, bucket: &str) -> Result<bool, RuleBookError> {
        validate_bucket_name(bucket)?;
        let mut existed = false;
        self.save_then(bucket, &json!({ "notifications": [] }), |buckets| {
            existed = buckets.remove(bucket).is_some();
        })?;
        Ok(existed)
    }

    /// The rules of `bucket` that an event of `event_type` on `key` fires,
    /// in the order they were written.
    pub fn matching(&self, bucket: &str, event_type: EventType, key: &str) -> Vec<Arc<Rule>> {
        self.read(|buckets| {
            buckets
                .get(bucket)
                .map(|b| {
                    b.rules
                        .iter()
                        .filter(|r| r.matches(event_type, key))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// Every rule of `bucket`.
    pub fn rules(&self, bucket: &str) -> Vec<Arc<Rule>> {
        self.read(|buckets| {
            buckets
                .get(bucket)
                .map(|b| b.rules.clone())
                .unwrap_or_default()
        })
    }

    /// The buckets that have rules, sorted.
    pub fn buckets(&self) -> Vec<String> {
        let mut names = self.read(|buckets| buckets.keys().cloned().collect::<Vec<_>>());
        names.sort();
        names
    }

    fn read<T>(&self, f: impl FnOnce(&HashMap<String, BucketRules>) -> T) -> T {
        f(&self.buckets.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Saves `raw` as the state of `bucket`, then applies `update`, both
    /// under one lock so that the saved state and memory agree whatever the
    /// order of concurrent calls. Nothing changes when saving fails.
    fn save_then(
        &self,
        bucket: &str,
        raw: &Value,
        update: impl FnOnce(&mut HashMap<String, BucketRules>),
    ) -> Result<(), RuleBookError> {
        let _saving = self.saving.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(dir) = &self.state_dir {
            write_atomically(dir, bucket, raw)?;
        }
        update(&mut self.buckets.write().unwrap_or_else(PoisonError::into_inner));
        Ok(())
    }

    /// Loads the saved rules of each bucket, replacing file-loaded ones.
    fn load_state(&self, dir: &Path) -> Result<(), RuleBookError> {
        remove_stale_temp_files(dir);
        for path in json_files(dir)? {
            let invalid = |source| RuleBookError::InvalidFile {
                path: path.clone(),
                source,
            };
            let bucket = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            validate_bucket_name(&bucket).map_err(invalid)?;
            let bytes = read(&path)?;
            let (raw, rules) = notifications_from_body(&bytes, &bucket).map_err(invalid)?;
            let rules = rules.into_iter().map(Arc::new).collect();
            let mut buckets = self.buckets.write().unwrap_or_else(PoisonError::into_inner);
            if buckets.contains_key(&bucket) {
                tracing::info!(
                    bucket,
                    "rules set through the API replace the bucket's rules from functions/"
                );
            }
            replace(&mut buckets, bucket, rules, raw);
        }
        Ok(())
    }
}

/// The rules that files in `functions/` give one bucket.
#[derive(Default)]
struct FileRules {
    /// The notification objects as written, for `get_raw`.
    items: Vec<Value>,
    rules: Vec<Arc<Rule>>,
    /// The file each rule id came from, for duplicate-id messages.
    origins: HashMap<String, PathBuf>,
}

/// Makes `rules` the rules of `bucket`; no rules means no entry, so that
/// `get_raw` answers `None` for a bucket without rules.
fn replace(
    buckets: &mut HashMap<String, BucketRules>,
    bucket: String,
    rules: Vec<Arc<Rule>>,
    raw: Value,
) {
    if rules.is_empty() {
        buckets.remove(&bucket);
    } else {
        buckets.insert(bucket, BucketRules { rules, raw });
    }
}

/// The `*.json` files of `dir`, sorted, skipping hidden ones (temp files).
fn json_files(dir: &Path) -> Result<Vec<PathBuf>, RuleBookError> {
    let io_error = |source| RuleBookError::Io {
        op: "list",
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error)? {
        let path = entry.map_err(io_error)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // A link to a missing file is read (and its error names it), not
        // skipped unseen. Folders, FIFOs and the like are passed over.
        let link = path.symlink_metadata().is_ok_and(|m| m.is_symlink());
        if name.ends_with(".json") && !name.starts_with('.') && (path.is_file() || link) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> Result<Vec<u8>, RuleBookError> {
    fs::read(path).map_err(|source| RuleBookError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `<dir>/<bucket>.json` through a hidden temp file and a rename, so
/// that a crash leaves either the old file or the new one, never half of one.
fn write_atomically(dir: &Path, bucket: &str, raw: &Value) -> Result<(), RuleBookError> {
    let target = dir.join(format!("{bucket}.json"));
    // Named apart from the bucket, so that the longest name still fits.
    let temp = dir.join(format!(".json.tmp-{:016x}", rand::random::<u64>()));
    let write = || -> io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(raw)?;
        bytes.push(b'\n');
        let mut file = fs::File::create_new(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&temp, &target)
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&temp);
        RuleBookError::Io {
            op: "write",
            path: target,
            source,
        }
    })
}

/// Removes temp files a crash left behind in the state directory.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(".json.tmp-") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(id: &str, filter: &str) -> Vec<u8> {
        json!({"notifications": [{
            "id": id, "event_types": ["create_object"], "object_filters": [filter],
            "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_100"}}]})
        .to_string()
        .into_bytes()
    }

    fn file(bucket: &str, id: &str, filter: &str) -> String {
        json!({"bucket": bucket, "notifications": [{
            "id": id, "event_types": "create_object", "object_filters": filter,
            "cloudfunc": "notifier", "notify_url": "http://127.0.0.1:1/hook"}]})
        .to_string()
    }

    fn ids(rules: &[Arc<Rule>]) -> Vec<&str> {
        rules.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn set_get_match_delete_in_memory() {
        let book = RuleBook::new();
        assert_eq!(book.get_raw("photos"), None);
        book.set("photos", &body("thumbs", "*.jpg")).unwrap();

        let raw = book.get_raw("photos").unwrap();
        assert_eq!(
            raw,
            serde_json::from_slice::<Value>(&body("thumbs", "*.jpg")).unwrap()
        );
        assert_eq!(
            ids(&book.matching("photos", EventType::CreateObject, "a/b.jpg")),
            ["thumbs"]
        );
        assert!(
            book.matching("photos", EventType::CreateObject, "a/b.png")
                .is_empty()
        );
        assert!(
            book.matching("photos", EventType::DeleteObject, "a/b.jpg")
                .is_empty()
        );
        assert!(
            book.matching("other", EventType::CreateObject, "a/b.jpg")
                .is_empty()
        );
        assert_eq!(book.buckets(), ["photos"]);

        book.set("photos", &body("small", "*.png")).unwrap();
        assert_eq!(ids(&book.rules("photos")), ["small"], "set replaces");

        assert!(book.delete("photos").unwrap());
        assert!(!book.delete("photos").unwrap());
        assert_eq!(book.get_raw("photos"), None);
        assert!(book.rules("photos").is_empty());
    }

    #[test]
    fn invalid_set_changes_nothing() {
        let book = RuleBook::new();
        book.set("photos", &body("thumbs", "*.jpg")).unwrap();
        let err = book
            .set("photos", br#"{"notifications": [{"id": "x"}]}"#)
            .unwrap_err();
        assert!(
            matches!(&err, RuleBookError::Invalid(e) if e.field == "notifications[0].event_types"),
            "{err}"
        );
        assert_eq!(ids(&book.rules("photos")), ["thumbs"]);

        let err = book.set("../escape", &body("thumbs", "*.jpg")).unwrap_err();
        assert!(
            matches!(&err, RuleBookError::Invalid(e) if e.field == "bucket"),
            "{err}"
        );
    }

    #[test]
    fn empty_set_removes_the_rules() {
        let book = RuleBook::new();
        book.set("photos", &body("thumbs", "*.jpg")).unwrap();
        book.set("photos", br#"{"notifications": []}"#).unwrap();
        assert_eq!(book.get_raw("photos"), None);
    }

    #[test]
    fn load_dir_reads_and_merges_rule_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.json"), file("photos", "jpgs", "*.jpg")).unwrap();
        fs::write(dir.path().join("b.json"), file("photos", "pngs", "*.png")).unwrap();
        fs::write(dir.path().join("c.json"), file("docs", "all", "")).unwrap();
        fs::write(dir.path().join("notes.txt"), "not a rule").unwrap();
        fs::write(dir.path().join(".hidden.json"), "{").unwrap();

        let book = RuleBook::new();
        assert_eq!(book.load_dir(dir.path()).unwrap(), 3);
        assert_eq!(book.buckets(), ["docs", "photos"]);
        assert_eq!(ids(&book.rules("photos")), ["jpgs", "pngs"]);
        assert_eq!(
            ids(&book.matching("photos", EventType::CreateObject, "x/y.png")),
            ["pngs"]
        );
        assert_eq!(
            ids(&book.matching("docs", EventType::CreateObject, "x.pdf")),
            ["all"]
        );
        let raw = book.get_raw("photos").unwrap();
        assert_eq!(raw["notifications"].as_array().unwrap().len(), 2);
        assert!(
            raw.get("bucket").is_none(),
            "the raw form is QingStor's body"
        );
    }

    #[test]
    fn load_dir_refuses_invalid_files_and_duplicate_ids() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.json"), file("photos", "same", "*.jpg")).unwrap();
        fs::write(dir.path().join("b.json"), file("photos", "same", "*.png")).unwrap();
        let book = RuleBook::new();
        let err = book.load_dir(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("b.json") && text.contains("duplicate id `same`"),
            "{text}"
        );
        assert!(book.buckets().is_empty(), "nothing loaded");

        fs::write(dir.path().join("b.json"), r#"{"bucket": "photos", "notifications": [{"id": "b", "event_types": "create_object", "cloudfunc": "tupu-porn"}]}"#).unwrap();
        let err = book.load_dir(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("b.json: notifications[0].cloudfunc: unknown cloudfunc `tupu-porn`"),
            "{text}"
        );

        // An image rule on a bucket the store would refuse: every event on
        // it would fail.
        let image_rule = json!({"bucket": "Photos", "notifications": [{
            "id": "b", "event_types": "create_object", "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_10"}}]});
        fs::write(dir.path().join("b.json"), image_rule.to_string()).unwrap();
        let err = book.load_dir(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("b.json: bucket: invalid bucket name \"Photos\"")
                && text.contains("'P' is not allowed"),
            "{text}"
        );
        assert!(book.buckets().is_empty(), "nothing loaded");
        // A notifier rule reads nothing from the store: any bucket name an
        // event may carry will do.
        fs::write(dir.path().join("b.json"), file("Photos", "b", "*.png")).unwrap();
        assert_eq!(book.load_dir(dir.path()).unwrap(), 2);
        assert_eq!(book.buckets(), ["Photos", "photos"]);

        let err = book.load_dir(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, RuleBookError::Io { op: "list", .. }), "{err}");
    }

    #[test]
    fn api_rules_persist_across_reopen_and_replace_file_rules() {
        let functions = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        fs::write(
            functions.path().join("photos.json"),
            file("photos", "from-file", "*.jpg"),
        )
        .unwrap();
        fs::write(
            functions.path().join("docs.json"),
            file("docs", "docs-file", "*"),
        )
        .unwrap();

        let book = RuleBook::open(state.path(), Some(functions.path())).unwrap();
        assert_eq!(ids(&book.rules("photos")), ["from-file"]);
        book.set("photos", &body("from-api", "*.png")).unwrap();
        book.set("videos", &body("clips", "*.mp4")).unwrap();
        assert!(book.delete("docs").unwrap());
        drop(book);

        let names: Vec<_> = fs::read_dir(state.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with('.')),
            "no temp files left: {names:?}"
        );

        let book = RuleBook::open(state.path(), Some(functions.path())).unwrap();
        assert_eq!(
            ids(&book.rules("photos")),
            ["from-api"],
            "API rules replace file rules"
        );
        assert_eq!(ids(&book.rules("videos")), ["clips"]);
        assert!(
            book.rules("docs").is_empty(),
            "a delete survives the restart"
        );
        assert_eq!(
            book.get_raw("photos").unwrap(),
            serde_json::from_slice::<Value>(&body("from-api", "*.png")).unwrap()
        );
        assert_eq!(book.buckets(), ["photos", "videos"]);
    }

    #[test]
    fn rules_of_the_longest_bucket_name_are_written_and_read_back() {
        let state = tempfile::tempdir().unwrap();
        let bucket = "b".repeat(250);
        let notifier = json!({"notifications": [{
            "id": "tell", "event_types": ["create_object"],
            "cloudfunc": "notifier", "notify_url": "http://127.0.0.1:9/x"}]});
        let book = RuleBook::open(state.path(), None).unwrap();
        book.set(&bucket, notifier.to_string().as_bytes()).unwrap();
        drop(book);
        let book = RuleBook::open(state.path(), None).unwrap();
        assert_eq!(book.get_raw(&bucket).unwrap(), notifier);
        assert!(book.delete(&bucket).unwrap());
    }

    #[test]
    fn a_rule_file_that_links_to_nothing_is_named_not_skipped() {
        let (state, functions) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::os::unix::fs::symlink(
            functions.path().join("gone.json"),
            functions.path().join("thumbs.json"),
        )
        .unwrap();
        // A folder or a FIFO with the extension is no rule file (a FIFO
        // would hang the start, waiting for a writer).
        fs::create_dir(functions.path().join("old.json")).unwrap();
        let fifo = std::ffi::CString::new(
            functions
                .path()
                .join("pipe.json")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let err = RuleBook::open(state.path(), Some(functions.path())).unwrap_err();
        assert!(err.to_string().contains("thumbs.json"), "{err}");
        fs::remove_file(functions.path().join("thumbs.json")).unwrap();
        RuleBook::open(state.path(), Some(functions.path())).unwrap();
    }

    #[test]
    fn open_cleans_temp_files_and_refuses_corrupt_state() {
        let state = tempfile::tempdir().unwrap();
        fs::write(state.path().join(".photos.json.tmp-0123"), "{").unwrap();
        RuleBook::open(state.path(), None).unwrap();
        assert!(!state.path().join(".photos.json.tmp-0123").exists());

        fs::write(state.path().join("photos.json"), "{\"notifications\": [").unwrap();
        let err = RuleBook::open(state.path(), None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("photos.json: body: invalid JSON"), "{text}");
    }

    #[test]
    fn image_rules_on_events_without_an_object_are_refused_when_set_not_when_saved() {
        let state = tempfile::tempdir().unwrap();
        let rule =
            br#"{"notifications": [{"id": "t", "event_types": ["create_object", "delete_object"],
            "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_10"}}]}"#;
        // Saved by a version that took it: loaded as it is.
        fs::write(state.path().join("photos.json"), rule).unwrap();
        let book = RuleBook::open(state.path(), None).unwrap();
        assert_eq!(book.rules("photos").len(), 1);
        // Set now: refused, naming the field.
        let err = book.set("marks", rule).unwrap_err().to_string();
        assert!(
            err.contains("event_types") && err.contains("`delete_object` leaves no object"),
            "{err}"
        );
        // In functions/: refused at start.
        let functions = tempfile::tempdir().unwrap();
        fs::write(
            functions.path().join("t.json"),
            br#"{"bucket": "photos", "notifications": [{"id": "t", "event_types": ["abort_multipart"],
                "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_10"}}]}"#,
        )
        .unwrap();
        let other = tempfile::tempdir().unwrap();
        let err = RuleBook::open(other.path(), Some(functions.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`abort_multipart` leaves no object"), "{err}");
    }

    #[test]
    fn a_bucket_takes_a_bounded_number_of_rules_when_set_not_when_saved() {
        use super::super::validate::MAX_RULES_PER_BUCKET;
        let rules = |n: usize| {
            let list: Vec<Value> = (0..n)
                .map(|i| {
                    json!({"id": format!("r{i}"), "event_types": ["create_object"],
                           "cloudfunc": "notifier", "notify_url": "http://127.0.0.1:1/hook"})
                })
                .collect();
            json!({"notifications": list})
        };
        let state = tempfile::tempdir().unwrap();
        // Saved by a version that took more: loaded as they are.
        fs::write(
            state.path().join("photos.json"),
            rules(MAX_RULES_PER_BUCKET + 1).to_string(),
        )
        .unwrap();
        let book = RuleBook::open(state.path(), None).unwrap();
        assert_eq!(book.rules("photos").len(), MAX_RULES_PER_BUCKET + 1);
        // Set now: at most the bound.
        let at_most = rules(MAX_RULES_PER_BUCKET).to_string();
        book.set("marks", at_most.as_bytes()).unwrap();
        let over = rules(MAX_RULES_PER_BUCKET + 1).to_string();
        let err = book.set("marks", over.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("at most 100"), "{err}");
        // In functions/, counted over all the files of a bucket.
        let functions = tempfile::tempdir().unwrap();
        for (name, range) in [("a.json", 0..60), ("b.json", 60..120)] {
            let list: Vec<Value> = range
                .map(|i| {
                    json!({"id": format!("r{i}"), "event_types": ["create_object"],
                           "cloudfunc": "notifier", "notify_url": "http://127.0.0.1:1/hook"})
                })
                .collect();
            fs::write(
                functions.path().join(name),
                json!({"bucket": "photos", "notifications": list}).to_string(),
            )
            .unwrap();
        }
        let other = tempfile::tempdir().unwrap();
        let err = RuleBook::open(other.path(), Some(functions.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("120 rules") && err.contains("photos"), "{err}");
    }

    #[test]
    fn filter_patterns_are_bounded_in_length_and_per_bucket_when_set_not_when_saved() {
        use super::super::rule::MAX_PATTERN_BYTES;
        use super::super::validate::MAX_REGEX_FILTER_BYTES_PER_BUCKET as BUDGET;
        let rule = |id: &str, filters: Vec<String>| {
            json!({"id": id, "event_types": ["create_object"], "object_filters": filters,
                   "cloudfunc": "notifier", "notify_url": "http://127.0.0.1:1/hook"})
        };
        let state = tempfile::tempdir().unwrap();
        // A pattern one byte over the longest key, named by its place and
        // shown cut.
        let long = format!("photos/{}", "x".repeat(MAX_PATTERN_BYTES - 6));
        let body = json!({"notifications": [rule("r", vec!["*.jpg".into(), long.clone()])]});
        // Saved by a version that took it: loaded as it is.
        fs::write(state.path().join("photos.json"), body.to_string()).unwrap();
        let book = RuleBook::open(state.path(), None).unwrap();
        assert_eq!(book.rules("photos").len(), 1);
        let err = book
            .set("marks", body.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("object_filters") && err.contains("pattern 1"),
            "{err}"
        );
        assert!(
            err.contains(&format!("{} bytes", MAX_PATTERN_BYTES + 1)),
            "{err}"
        );
        assert!(err.len() < 400, "the pattern shown whole: {err}");
        // Patterns of the hostile kind (each `?` after a `*` a state of a
        // regular expression) are held to the bucket's budget together...
        let hostile = format!("*a{}c", "?".repeat(253));
        let per_rule = BUDGET / hostile.len();
        let rules = |n: usize, pattern: &str, per: usize| {
            let list: Vec<Value> = (0..n)
                .map(|i| rule(&format!("r{i}"), vec![pattern.to_string(); per]))
                .collect();
            json!({"notifications": list}).to_string()
        };
        book.set("marks", rules(1, &hostile, per_rule).as_bytes())
            .unwrap();
        let err = book
            .set("marks", rules(2, &hostile, per_rule).as_bytes())
            .unwrap_err()
            .to_string();
        let bytes = 2 * per_rule * hostile.len();
        assert!(
            err.contains(&format!("{bytes} bytes of patterns"))
                && err.contains(&format!("at most {BUDGET}")),
            "{err}"
        );
        assert_eq!(
            book.rules("marks").len(),
            1,
            "the refused set left the rules as they were"
        );
        // ...while a hundred rules of everyday patterns fit: literal
        // suffixes and prefixes are not counted, and short regular
        // expressions fit the budget.
        for pattern in ["*.jpg", "photos/*", "uploads/originals/*.jpg"] {
            book.set("marks", rules(100, pattern, 1).as_bytes())
                .unwrap_or_else(|e| panic!("{pattern}: {e}"));
        }
    }

    #[test]
    fn a_text_watermark_that_would_draw_nothing_is_refused_when_set_not_when_saved() {
        // An emoji the font lacks.
        let rule = br#"{"notifications": [{"id": "t", "event_types": ["create_object"],
            "cloudfunc": "image", "cloudfunc_args": {"action": "watermark:t_8J-YgA"}}]}"#;
        let state = tempfile::tempdir().unwrap();
        fs::write(state.path().join("photos.json"), rule).unwrap();
        let book = RuleBook::open(state.path(), None).unwrap();
        assert_eq!(book.rules("photos").len(), 1);
        let err = book.set("marks", rule).unwrap_err().to_string();
        assert!(
            err.contains("notifications[0].cloudfunc_args.action")
                && err.contains("no character the font draws"),
            "{err}"
        );
    }

    #[test]
    fn a_resize_over_the_limits_for_every_source_is_refused_when_set() {
        let state = tempfile::tempdir().unwrap();
        let book = RuleBook::open(state.path(), None).unwrap();
        let rule = |action: &str| {
            json!({"notifications": [{"id": "r", "event_types": ["create_object"],
                "cloudfunc": "image", "cloudfunc_args": {"action": action}}]})
            .to_string()
        };
        for (action, says) in [
            (
                "resize:w_20000",
                "w_20000 is over the limit of 16384 px per side",
            ),
            (
                "crop:w_10|resize:h_16385",
                "h_16385 is over the limit of 16384 px per side",
            ),
            ("resize:w_16385,h_10,m_2", "16384 px per side"),
            ("resize:w_20000,h_20000,m_1", "20000x20000"),
            ("resize:w_10001,h_10000,m_0", "100000000 pixels"),
        ] {
            let err = book
                .set("photos", rule(action).as_bytes())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("notifications[0].cloudfunc_args.action")
                    && err.contains(says)
                    && err.contains("whatever the source"),
                "{action}: {err}"
            );
        }
        // Sides that some source can have.
        for action in [
            "resize:w_16384",
            "resize:w_20000,h_300,m_1",
            "resize:w_10000,h_10000,m_2",
        ] {
            book.set("photos", rule(action).as_bytes())
                .unwrap_or_else(|e| panic!("{action}: {e}"));
        }
    }

    #[test]
    fn the_shipped_rule_takes_photos_whatever_the_case_of_their_extension() {
        let state = tempfile::tempdir().unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("functions");
        let book = RuleBook::open(state.path(), Some(&shipped)).unwrap();
        for key in [
            "a.jpg",
            "IMG_0001.JPG",
            "b/c.jpeg",
            "D.JPEG",
            "e.png",
            "F.PNG",
            "g.WEBP",
        ] {
            let rules = book.matching("photos", EventType::CreateObject, key);
            assert_eq!(rules.len(), 1, "{key}");
        }
        assert!(
            book.matching("photos", EventType::CreateObject, "notes.txt")
                .is_empty()
        );
    }

    #[test]
    fn open_creates_the_state_dir() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state/rules");
        let book = RuleBook::open(&state, None).unwrap();
        book.set("photos", &body("thumbs", "*.jpg")).unwrap();
        assert!(state.join("photos.json").is_file());
    }

    #[test]
    fn concurrent_sets_leave_memory_and_disk_in_agreement() {
        let state = tempfile::tempdir().unwrap();
        let book = Arc::new(RuleBook::open(state.path(), None).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let book = Arc::clone(&book);
                std::thread::spawn(move || {
                    book.set("photos", &body(&format!("r{i}"), "*")).unwrap()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let in_memory = book.get_raw("photos").unwrap();
        let reopened = RuleBook::open(state.path(), None).unwrap();
        assert_eq!(reopened.get_raw("photos").unwrap(), in_memory);
    }
}
