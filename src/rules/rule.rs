use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::error::RuleError;
use super::event_type::EventType;
use crate::action::Action;

/// `key_prefix` when a rule does not give one.
pub const DEFAULT_KEY_PREFIX: &str = "gen";
/// `key_seprate` (QingStor's spelling) when a rule does not give one.
pub const DEFAULT_KEY_SEPRATE: &str = "_";

/// Bytes of a rule id kept as they are where the id is written into an
/// object's metadata (its rule chain); the others are percent-encoded, so
/// the text is printable ASCII without `,` or `:` whatever the id holds.
const ID_KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

/// `id` as it is written into metadata: percent-encoded (see [`ID_KEPT`]).
pub fn id_in_metadata(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, ID_KEPT).to_string()
}

/// A validated notification rule of one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique among the rules of its bucket.
    pub id: String,
    /// The events that fire the rule; never empty, no duplicates.
    pub event_types: Vec<EventType>,
    /// Which object keys the rule applies to.
    pub filters: ObjectFilters,
    /// What runs when the rule fires.
    pub cloudfunc: CloudFunc,
    /// Where the result is POSTed: an http or https URL.
    pub notify_url: Option<String>,
}

impl Rule {
    /// True when an event of `event_type` on `key` fires this rule.
    pub fn matches(&self, event_type: EventType, key: &str) -> bool {
        self.event_types.contains(&event_type) && self.filters.matches(key)
    }

    /// The `image` arguments, when the rule runs the `image` cloudfunc.
    pub fn image_args(&self) -> Option<&ImageArgs> {
        match &self.cloudfunc {
            CloudFunc::Image(args) => Some(args),
            CloudFunc::Notifier => None,
        }
    }
}

/// The functions a rule can name.
#[derive(Debug, Clone, PartialEq)]
pub enum CloudFunc {
    /// Run an action pipeline on the object and store the result.
    Image(ImageArgs),
    /// POST the event to `notify_url`, nothing else.
    Notifier,
}

impl CloudFunc {
    /// The names accepted in `cloudfunc`, for messages.
    pub const SUPPORTED: &'static str = "image, notifier";

    /// The name as written in `cloudfunc`.
    pub fn name(&self) -> &'static str {
        match self {
            CloudFunc::Image(_) => "image",
            CloudFunc::Notifier => "notifier",
        }
    }
}

/// `cloudfunc_args` of the `image` cloudfunc, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageArgs {
    /// The pipeline to run, parsed when the rule was set.
    pub action: Action,
    /// Put before the original key in output keys.
    pub key_prefix: String,
    /// QingStor's spelling of "separator".
    pub key_seprate: String,
    /// Where outputs go; `None` means the bucket of the original.
    pub save_bucket: Option<String>,
}

impl ImageArgs {
    /// The key of the output for the original `key`: `key_prefix +
    /// key_seprate + key`, folders kept (`photos/a.jpg` → `gen_photos/a.jpg`).
    pub fn output_key(&self, key: &str) -> String {
        let mut out =
            String::with_capacity(self.key_prefix.len() + self.key_seprate.len() + key.len());
        out.push_str(&self.key_prefix);
        out.push_str(&self.key_seprate);
        out.push_str(key);
        out
    }

    /// The bucket the output goes to: `save_bucket`, else the original's.
    pub fn output_bucket<'a>(&'a self, source_bucket: &'a str) -> &'a str {
        self.save_bucket.as_deref().unwrap_or(source_bucket)
    }
}

/// The longest `object_filters` pattern taken when rules are set: the
/// longest key. A glob compiles to many times its own size (a `{a0,a1,…}`
/// alternation of a megabyte took 60 MB).
pub const MAX_PATTERN_BYTES: usize = 1024;

/// A rule's `object_filters`, compiled once.
///
/// Patterns are globs matched against the whole object key, case-sensitively
/// as keys are. `*` and `?` also match `/`, because QingStor's documentation
/// writes `*.jpg` for every jpg, including those in folders: `*.jpg` matches
/// `photos/2024/a.jpg`, and `photos/*` matches everything under `photos/`.
/// `**`, `[abc]` and `{jpg,png}` work as in globset. No patterns means every
/// key matches.
#[derive(Debug, Clone)]
pub struct ObjectFilters {
    patterns: Vec<String>,
    set: GlobSet,
}

impl ObjectFilters {
    /// Compiles the patterns, leaving out empty ones (an empty pattern could
    /// only match an empty key; QingStor users write `"object_filters": ""`
    /// to mean "no filter"). The error names the first one that is not a
    /// valid glob as `object_filters[i]`, `i` counting the list as written.
    pub fn new(mut patterns: Vec<String>) -> Result<ObjectFilters, RuleError> {
        let mut builder = GlobSetBuilder::new();
        for (i, pattern) in patterns.iter().enumerate() {
            if pattern.is_empty() {
                continue;
            }
            let glob = GlobBuilder::new(pattern)
                .literal_separator(false)
                .build()
                .map_err(|e| {
                    RuleError::new(format!("object_filters[{i}]"), format!("invalid glob: {e}"))
                })?;
            builder.add(glob);
        }
        let set = builder
            .build()
            .map_err(|e| RuleError::new("object_filters", format!("invalid globs: {e}")))?;
        patterns.retain(|p| !p.is_empty());
        Ok(ObjectFilters { patterns, set })
    }

    /// Filters that match every key.
    pub fn any() -> ObjectFilters {
        ObjectFilters {
            patterns: Vec::new(),
            set: GlobSet::empty(),
        }
    }

    /// True when `key` matches one of the patterns, or there are none.
    pub fn matches(&self, key: &str) -> bool {
        self.patterns.is_empty() || self.set.is_match(key)
    }

    /// The patterns as written.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

impl PartialEq for ObjectFilters {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(patterns: &[&str]) -> ObjectFilters {
        ObjectFilters::new(patterns.iter().map(|p| p.to_string()).collect()).unwrap()
    }

    fn image_args(prefix: &str, sep: &str, save_bucket: Option<&str>) -> ImageArgs {
        ImageArgs {
            action: Action::parse("resize:w_300").unwrap(),
            key_prefix: prefix.into(),
            key_seprate: sep.into(),
            save_bucket: save_bucket.map(str::to_string),
        }
    }

    #[test]
    fn star_matches_across_folders() {
        let f = filters(&["*.jpg"]);
        assert!(f.matches("a.jpg"));
        assert!(f.matches("photos/a.jpg"));
        assert!(f.matches("photos/2024/05/a.jpg"));
        assert!(!f.matches("a.png"));
        assert!(!f.matches("a.jpg.png"));
        assert!(!f.matches("A.JPG"), "keys are case-sensitive");
    }

    #[test]
    fn folder_prefix_pattern_matches_everything_below() {
        let f = filters(&["photos/*"]);
        assert!(f.matches("photos/a.jpg"));
        assert!(f.matches("photos/deep/b.png"));
        assert!(!f.matches("other/photos/a.jpg"));
        assert!(!f.matches("photos"));
    }

    #[test]
    fn any_pattern_of_several_matches() {
        let f = filters(&["*.jpg", "raw/*", "img-?.{png,webp}"]);
        assert!(f.matches("x/y.jpg"));
        assert!(f.matches("raw/file.bin"));
        assert!(f.matches("img-1.webp"));
        assert!(!f.matches("img-10.webp"));
        assert!(!f.matches("doc.txt"));
    }

    #[test]
    fn no_patterns_match_every_key() {
        assert!(filters(&[]).matches("anything/at/all.bin"));
        assert!(ObjectFilters::any().matches(""));
    }

    #[test]
    fn bad_glob_names_its_index() {
        let err = ObjectFilters::new(vec!["*.jpg".into(), "photos/[a-".into()]).unwrap_err();
        assert_eq!(err.field, "object_filters[1]");
        assert!(err.message.starts_with("invalid glob: "), "{err}");
        // Empty patterns are left out but still counted in the index.
        let err = ObjectFilters::new(vec!["".into(), "a[b".into()]).unwrap_err();
        assert_eq!(err.field, "object_filters[1]");
        let kept = ObjectFilters::new(vec!["".into(), "*.png".into()]).unwrap();
        assert_eq!(kept.patterns(), ["*.png"]);
        assert!(kept.matches("a.png") && !kept.matches("a.jpg"));
    }

    #[test]
    fn rule_matches_event_type_and_key() {
        let rule = Rule {
            id: "r".into(),
            event_types: vec![EventType::CreateObject, EventType::CompleteMultipart],
            filters: filters(&["*.jpg"]),
            cloudfunc: CloudFunc::Notifier,
            notify_url: Some("http://127.0.0.1/hook".into()),
        };
        assert!(rule.matches(EventType::CreateObject, "a/b.jpg"));
        assert!(rule.matches(EventType::CompleteMultipart, "b.jpg"));
        assert!(!rule.matches(EventType::DeleteObject, "b.jpg"));
        assert!(!rule.matches(EventType::CreateObject, "b.png"));
    }

    #[test]
    fn output_key_keeps_folders() {
        let args = image_args("gen", "_", None);
        assert_eq!(args.output_key("a.jpg"), "gen_a.jpg");
        assert_eq!(args.output_key("photos/a.jpg"), "gen_photos/a.jpg");
        assert_eq!(
            image_args("thumbs", "/", None).output_key("photos/a.jpg"),
            "thumbs/photos/a.jpg"
        );
    }

    #[test]
    fn output_bucket_defaults_to_the_source() {
        assert_eq!(
            image_args("gen", "_", None).output_bucket("photos"),
            "photos"
        );
        assert_eq!(
            image_args("gen", "_", Some("thumbs")).output_bucket("photos"),
            "thumbs"
        );
    }
}
