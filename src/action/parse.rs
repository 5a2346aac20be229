use crate::shown;
use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

use super::{
    Action, ActionError, Color, Crop, CropAnchor, Format, FormatKind, Gravity, ImageWatermark, Op,
    Opacity, Resize, ResizeMode, Rotation, Save, TextWatermark,
};

const OPERATIONS: &str = "info, crop, rotate, resize, watermark, watermark_image, format, save";

/// Largest width/height/offset the language accepts; the imaging limits are tighter.
pub(super) const MAX_SIDE: u32 = 1 << 20;
const MAX_DPI: u32 = 2400;

/// The longest watermark text: every glyph is laid out before the text is
/// clipped to the image, so the length bounds the work.
const MAX_WATERMARK_CHARS: usize = 1000;

/// The most operations one action may hold: each may work on the whole
/// image, so the count bounds an event's work (a rule's body may be 2 MiB).
pub(super) const MAX_OPERATIONS: usize = 32;

/// The most `watermark_image` operations in one action: their images (up
/// to 10 MiB each) are all fetched before the image work starts.
pub(super) const MAX_WATERMARK_IMAGES: usize = 4;

/// The most `save` operations in one action: each keeps its encoded image
/// (up to the pixel limit's size, 300 MB as an uncompressed TIFF) until the
/// invocation has done its image work and writes them all.
pub(super) const MAX_SAVES: usize = 4;

pub(super) fn parse(input: &str) -> Result<Action, ActionError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(ActionError::Empty);
    }
    let count = input.split('|').count();
    if count > MAX_OPERATIONS {
        return Err(ActionError::TooMany {
            what: "",
            max: MAX_OPERATIONS,
            count,
        });
    }
    let ops = input
        .split('|')
        .enumerate()
        .map(|(i, part)| parse_op(i + 1, part.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let images = ops
        .iter()
        .filter(|op| matches!(op, Op::WatermarkImage(_)))
        .count();
    if images > MAX_WATERMARK_IMAGES {
        return Err(ActionError::TooMany {
            what: " watermark_image operations",
            max: MAX_WATERMARK_IMAGES,
            count: images,
        });
    }
    let saves = ops.iter().filter(|op| matches!(op, Op::Save(_))).count();
    if saves > MAX_SAVES {
        return Err(ActionError::TooMany {
            what: " save operations",
            max: MAX_SAVES,
            count: saves,
        });
    }
    Ok(Action { ops })
}

fn parse_op(position: usize, part: &str) -> Result<Op, ActionError> {
    if part.is_empty() {
        return Err(ActionError::EmptyOperation { position });
    }
    let (name, params) = part.split_once(':').unwrap_or((part, ""));
    let name = name.trim();
    match name {
        "info" => Params::new("info", "none", &[], params)?.finish(Op::Info),
        "crop" => parse_crop(params),
        "rotate" => parse_rotate(params),
        "resize" => parse_resize(params),
        "watermark" => parse_watermark(params),
        "watermark_image" => parse_watermark_image(params),
        "format" => parse_format(params),
        "save" => parse_save(params),
        _ => Err(ActionError::UnknownOperation {
            op: shown(name),
            allowed: OPERATIONS,
        }),
    }
}

/// The `k_v` pairs of one operation, consumed key by key so leftovers are errors.
struct Params<'a> {
    op: &'static str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Params<'a> {
    fn new(
        op: &'static str,
        allowed: &'static str,
        keys: &[&str],
        params: &'a str,
    ) -> Result<Params<'a>, ActionError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for param in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) =
                param
                    .split_once('_')
                    .ok_or_else(|| ActionError::MalformedParam {
                        op,
                        param: shown(param),
                    })?;
            // `w _100` and `w_ 100` read as `w_100`. (A base64 value never
            // starts with a `+` that form decoding made a space: no UTF-8
            // text or URL starts with the bytes that encode to it.)
            let (key, value) = (key.trim(), value.trim());
            if !keys.contains(&key) {
                return Err(ActionError::UnknownKey {
                    op,
                    key: shown(key),
                    allowed,
                });
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(ActionError::DuplicateKey {
                    op,
                    key: shown(key),
                });
            }
            pairs.push((key, value));
        }
        Ok(Params { op, pairs })
    }

    fn raw(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn invalid(&self, key: &'static str, value: &str, allowed: impl Into<String>) -> ActionError {
        ActionError::InvalidValue {
            op: self.op,
            key,
            value: if value.is_empty() {
                "nothing".to_string()
            } else {
                shown(value)
            },
            allowed: allowed.into(),
        }
    }

    fn uint(&self, key: &'static str, min: u32, max: u32) -> Result<Option<u32>, ActionError> {
        let Some(raw) = self.raw(key) else {
            return Ok(None);
        };
        match decimal(raw) {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(self.invalid(key, raw, format!("an integer from {min} to {max}"))),
        }
    }

    /// [`Params::uint`], with an empty value (`l_`) taken as not given:
    /// QingStor's crop and `watermark_image` give such a key its default.
    fn uint_or_empty(
        &self,
        key: &'static str,
        min: u32,
        max: u32,
    ) -> Result<Option<u32>, ActionError> {
        match self.raw(key) {
            Some("") => Ok(None),
            _ => self.uint(key, min, max),
        }
    }

    fn opacity(&self, key: &'static str) -> Result<Opacity, ActionError> {
        let Some(raw) = self.raw(key) else {
            return Ok(Opacity::DEFAULT);
        };
        // Decimal digits with at most one point (no sign, no exponent),
        // read as f64 first: a long run of digits is above 1, not an f32
        // overflow to infinity.
        let decimal = raw.bytes().any(|b| b.is_ascii_digit())
            && raw.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && raw.bytes().filter(|&b| b == b'.').count() <= 1;
        decimal
            .then(|| raw.parse::<f64>().ok())
            .flatten()
            .filter(|v| v.is_finite())
            .and_then(|v| Opacity::new(v.min(1.0) as f32))
            .ok_or_else(|| self.invalid(key, raw, "a number above 0 (values above 1 mean 1)"))
    }

    fn base64_text(&self, key: &'static str) -> Result<Option<String>, ActionError> {
        let Some(raw) = self.raw(key) else {
            return Ok(None);
        };
        decode_base64(raw)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|s| !s.is_empty())
            .map(Some)
            .ok_or_else(|| self.invalid(key, raw, "non-empty UTF-8 text in base64"))
    }

    fn required<T>(
        &self,
        key: &'static str,
        allowed: &'static str,
        value: Option<T>,
    ) -> Result<T, ActionError> {
        value.ok_or(ActionError::MissingKey {
            op: self.op,
            key,
            allowed,
        })
    }

    fn finish(self, op: Op) -> Result<Op, ActionError> {
        Ok(op)
    }
}

/// Accepts the standard and URL-safe alphabets, padded or not, and unused
/// low bits in the last character set (as most decoders do). A space is
/// read as `+`, which form-encoded query strings turn into spaces.
fn decode_base64(raw: &str) -> Option<Vec<u8>> {
    let raw = raw.replace(' ', "+");
    let raw = raw.as_str();
    const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);
    STANDARD.decode(raw).or_else(|_| URL_SAFE.decode(raw)).ok()
}

fn parse_crop(params: &str) -> Result<Op, ActionError> {
    let p = Params::new("crop", "w, h, g, l, t", &["w", "h", "g", "l", "t"], params)?;
    // QingStor: an empty value is the key's default (the image's side,
    // offset 0, gravity 0), as if the key were not given.
    let width = p.uint_or_empty("w", 1, MAX_SIDE)?;
    let height = p.uint_or_empty("h", 1, MAX_SIDE)?;
    let gravity = p.uint_or_empty("g", 0, 9)?;
    let left = p.uint_or_empty("l", 0, MAX_SIDE)?;
    let top = p.uint_or_empty("t", 0, MAX_SIDE)?;
    let anchor = match (gravity, left, top) {
        (Some(g), Some(_), _) | (Some(g), _, Some(_)) => {
            let offset = [("l", left), ("t", top)]
                .iter()
                .filter_map(|(key, value)| value.map(|v| format!("{key}_{v}")))
                .collect::<Vec<_>>()
                .join(",");
            return Err(ActionError::Conflict {
                op: "crop",
                message: format!(
                    "g_{g} cannot be combined with {offset}; use either gravity (g) or an \
                     offset (l, t)"
                ),
            });
        }
        (Some(g), None, None) => {
            CropAnchor::Gravity(Gravity::from_number(g).unwrap_or(Gravity::Center))
        }
        (None, None, None) => CropAnchor::Gravity(Gravity::Center),
        (None, l, t) => CropAnchor::Offset {
            left: l.unwrap_or(0),
            top: t.unwrap_or(0),
        },
    };
    p.finish(Op::Crop(Crop {
        width,
        height,
        anchor,
    }))
}

/// A number as the action language writes it: decimal digits only (Rust's
/// own parse would take a leading `+`).
fn decimal(raw: &str) -> Option<u32> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

fn parse_rotate(params: &str) -> Result<Op, ActionError> {
    let p = Params::new("rotate", "a", &["a"], params)?;
    let raw = p.required("a", "a in 0, 90, 180, 270", p.raw("a"))?;
    let rotation = decimal(raw)
        .and_then(Rotation::from_degrees)
        .ok_or_else(|| p.invalid("a", raw, "one of 0, 90, 180, 270"))?;
    p.finish(Op::Rotate(rotation))
}

fn parse_resize(params: &str) -> Result<Op, ActionError> {
    let p = Params::new("resize", "w, h, m", &["w", "h", "m"], params)?;
    let width = p.uint("w", 1, MAX_SIDE)?;
    let height = p.uint("h", 1, MAX_SIDE)?;
    let mode = match p.raw("m") {
        None => ResizeMode::Pad,
        Some(raw) => decimal(raw)
            .and_then(ResizeMode::from_number)
            .ok_or_else(|| p.invalid("m", raw, "one of 0 (pad), 1 (fit), 2 (cover)"))?,
    };
    if width.is_none() && height.is_none() {
        return Err(ActionError::MissingKey {
            op: "resize",
            key: "w",
            allowed: "give w, h or both",
        });
    }
    p.finish(Op::Resize(Resize {
        width,
        height,
        mode,
    }))
}

fn parse_watermark(params: &str) -> Result<Op, ActionError> {
    let p = Params::new("watermark", "t, p, d, c", &["t", "p", "d", "c"], params)?;
    let text = p.required("t", "t is the text in base64", p.base64_text("t")?)?;
    let chars = text.chars().count();
    if chars > MAX_WATERMARK_CHARS {
        let raw = p.raw("t").unwrap_or_default();
        let shown: String = raw.chars().take(16).collect();
        return Err(p.invalid(
            "t",
            &format!("{shown}... ({chars} characters)"),
            format!("text of at most {MAX_WATERMARK_CHARS} characters"),
        ));
    }
    let opacity = p.opacity("p")?;
    let dpi = p
        .uint("d", 1, MAX_DPI)?
        .unwrap_or(TextWatermark::DEFAULT_DPI);
    let color = match p.raw("c") {
        None => Color::BLACK,
        Some(raw) => decode_base64(raw)
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| Color::parse_hex(s.trim()))
            .ok_or_else(|| p.invalid("c", raw, "a colour #rrggbb in base64"))?,
    };
    p.finish(Op::Watermark(TextWatermark {
        text,
        opacity,
        dpi,
        color,
    }))
}

fn parse_watermark_image(params: &str) -> Result<Op, ActionError> {
    let p = Params::new(
        "watermark_image",
        "u, l, t, p",
        &["u", "l", "t", "p"],
        params,
    )?;
    let url = p.required("u", "u is the image URL in base64", p.base64_text("u")?)?;
    let left = p.uint_or_empty("l", 0, MAX_SIDE)?.unwrap_or(0);
    let top = p.uint_or_empty("t", 0, MAX_SIDE)?.unwrap_or(0);
    let opacity = p.opacity("p")?;
    p.finish(Op::WatermarkImage(ImageWatermark {
        url,
        left,
        top,
        opacity,
    }))
}

fn parse_format(params: &str) -> Result<Op, ActionError> {
    let p = Params::new("format", "t, q", &["t", "q"], params)?;
    let raw = p.required("t", "t in jpeg, png, webp, tiff", p.raw("t"))?;
    let kind = FormatKind::from_name(raw)
        .ok_or_else(|| p.invalid("t", raw, format!("one of {}", FormatKind::NAMES)))?;
    let quality = p.uint("q", 1, 100)?.map(|q| q as u8);
    p.finish(Op::Format(Format { kind, quality }))
}

fn parse_save(params: &str) -> Result<Op, ActionError> {
    let p = Params::new("save", "b, k", &["b", "k"], params)?;
    let bucket = p.required("b", "b is the bucket", p.raw("b"))?;
    let key = p.required("k", "k is the key", p.raw("k"))?;
    if bucket.is_empty() {
        return Err(p.invalid("b", bucket, "a non-empty bucket name"));
    }
    if key.is_empty() {
        return Err(p.invalid("k", key, "a non-empty key"));
    }
    let save = Save {
        bucket: bucket.to_string(),
        key: key.to_string(),
    };
    p.finish(Op::Save(save))
}
