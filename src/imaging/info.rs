//! The `info` operation: what the image is now, plus the source's EXIF.

use serde_json::{Map, Value, json};

use super::{ImageFormat, Pixels, SourceMeta};

/// Describes the current image (size, output type, alpha) and the source
/// (orientation, colour space, EXIF make, model, date, focal length, GPS).
pub(super) fn describe(
    input: &[u8],
    meta: &SourceMeta,
    pixels: &Pixels,
    format: ImageFormat,
) -> Value {
    let (width, height) = pixels.dimensions();
    let mut out = Map::new();
    out.insert("width".into(), json!(width));
    out.insert("height".into(), json!(height));
    out.insert("type".into(), json!(format.name()));
    out.insert("orientation".into(), json!(meta.orientation));
    out.insert("space".into(), json!(meta.space));
    out.insert(
        "alpha".into(),
        json!(pixels.has_alpha() && format.keeps_alpha()),
    );
    if meta.frames > 1 {
        out.insert("frames".into(), json!(meta.frames));
    }
    if let Some(exif) = super::decode::read_exif(input) {
        let fields = [
            ("make", exif::Tag::Make),
            ("model", exif::Tag::Model),
            ("datetime", exif::Tag::DateTimeOriginal),
            ("exifversion", exif::Tag::ExifVersion),
            ("focallength", exif::Tag::FocalLength),
            ("gpslatitude", exif::Tag::GPSLatitude),
            ("gpslatituderef", exif::Tag::GPSLatitudeRef),
            ("gpslongitude", exif::Tag::GPSLongitude),
            ("gpslongituderef", exif::Tag::GPSLongitudeRef),
            ("gpsaltitude", exif::Tag::GPSAltitude),
            ("gpsaltituderef", exif::Tag::GPSAltitudeRef),
        ];
        for (name, tag) in fields {
            let field = exif.get_field(tag, exif::In::PRIMARY).or_else(|| {
                (tag == exif::Tag::DateTimeOriginal)
                    .then(|| exif.get_field(exif::Tag::DateTime, exif::In::PRIMARY))
                    .flatten()
            });
            if let Some(text) = field.and_then(exif_text) {
                out.insert(name.into(), json!(text));
            }
        }
    }
    Value::Object(out)
}

/// A field's value as text the way EXIF stores it, as exiftool, libvips and
/// Pillow give it: strings as written (`2008:04:20 19:12:06`, the version
/// as `0221`), one rational as a decimal number (`18`, `5.4`), GPS degrees,
/// minutes and seconds as decimal degrees (`39.9065`), the altitude
/// reference in words. `None` for an empty or unreadable value.
fn exif_text(field: &exif::Field) -> Option<String> {
    use exif::Value as V;
    let decimal = |v: f64| {
        let text = format!("{v:.6}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        (v.is_finite()).then(|| text.to_string())
    };
    let text = match (&field.value, field.tag) {
        (V::Ascii(strings), _) => strings
            .first()
            .map(|s| String::from_utf8_lossy(s).into_owned())?,
        (V::Undefined(bytes, _), _) => String::from_utf8_lossy(bytes).into_owned(),
        (V::Rational(parts), exif::Tag::GPSLatitude | exif::Tag::GPSLongitude) => {
            let [d, m, s] = parts.as_slice() else {
                return None;
            };
            decimal(d.to_f64() + m.to_f64() / 60.0 + s.to_f64() / 3600.0)?
        }
        (V::Rational(parts), _) => decimal(parts.first()?.to_f64())?,
        (V::SRational(parts), _) => decimal(parts.first()?.to_f64())?,
        (V::Float(values), _) if values.len() == 1 => decimal(f64::from(values[0]))?,
        (V::Double(values), _) if values.len() == 1 => decimal(values[0])?,
        (V::SShort(values), _) if values.len() == 1 => values[0].to_string(),
        (V::SLong(values), _) if values.len() == 1 => values[0].to_string(),
        (V::Byte(bytes), exif::Tag::GPSAltitudeRef) => match bytes.first()? {
            0 => "above sea level".to_string(),
            1 => "below sea level".to_string(),
            _ => return None,
        },
        // One integer, as some writers store what should be text or a
        // rational; a list of them (a hostile file's Make of millions of
        // shorts) is no value of these fields.
        (value, _) => match value.iter_uint()?.count() {
            1 => value.get_uint(0)?.to_string(),
            _ => return None,
        },
    };
    let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    // A camera's make or model is a few dozen characters; a file's EXIF may
    // hold megabytes in one, which would travel into every result.
    let text: String = text.chars().take(MAX_TEXT_CHARS).collect();
    (!text.is_empty()).then_some(text)
}

/// The most characters of an EXIF value `info` gives.
const MAX_TEXT_CHARS: usize = 256;
