//! The `info` operation: what the image is now, plus the source's EXIF.

use std::io::Cursor;

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
    if let Ok(exif) = exif::Reader::new().read_from_container(&mut Cursor::new(input)) {
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
            if let Some(f) = field {
                let text = f.display_value().to_string();
                let text = text.trim_matches('"').trim().to_string();
                if !text.is_empty() {
                    out.insert(name.into(), json!(text));
                }
            }
        }
    }
    Value::Object(out)
}
