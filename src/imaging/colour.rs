//! Embedded colour profiles. Outputs carry no ICC profile, so a viewer reads
//! them as sRGB; pixels decoded from an image whose embedded RGB profile is
//! not sRGB (a phone's Display P3, Adobe RGB) are converted to sRGB first,
//! as libvips' thumbnail, sharp and imgproxy do, or their colours would
//! shift. A profile that does not parse, is not an RGB profile (grey,
//! CMYK) or is sRGB to within a level leaves the pixels as decoded.

use image::DynamicImage;
use moxcms::{ColorProfile, DataColorSpace, Layout, TransformOptions};

/// Largest profile read: real RGB profiles are a few kilobytes, large
/// printer profiles a few megabytes. A PNG's compressed profile that
/// inflates past it is dropped unread, not inflated whole.
pub const MAX_PROFILE_BYTES: usize = 4 << 20;

/// The ICC profile in a JPEG's APP2 segments (`ICC_PROFILE\0`, then the
/// chunk's number from 1 and the count), joined in order; `None` when there
/// is none, or its chunks are missing, repeated or numbered past the count.
pub fn jpeg_profile(jpeg: &[u8]) -> Option<Vec<u8>> {
    const TAG: &[u8] = b"ICC_PROFILE\0";
    let mut chunks: Vec<(u8, &[u8])> = Vec::new();
    let mut count = 0;
    for (marker, body) in super::jpeg_dc::header_segments(jpeg) {
        if marker == 0xe2
            && let Some([seq, total, data @ ..]) = body.strip_prefix(TAG)
        {
            count = *total;
            chunks.push((*seq, data));
        }
    }
    if chunks.is_empty() || chunks.len() != usize::from(count) {
        return None;
    }
    chunks.sort_by_key(|&(seq, _)| seq);
    if chunks
        .iter()
        .enumerate()
        .any(|(i, &(seq, _))| usize::from(seq) != i + 1)
    {
        return None;
    }
    let profile: Vec<u8> = chunks.iter().flat_map(|&(_, data)| data).copied().collect();
    (profile.len() <= MAX_PROFILE_BYTES).then_some(profile)
}

/// A PNG's `iCCP` profile, inflated to at most [`MAX_PROFILE_BYTES`]
/// (`None` past it): a 1 MB file can hold one that inflates to gigabytes,
/// which a decoder would inflate up to its whole memory limit, so the PNG
/// decoder is told to skip the chunk and it is read here.
pub fn png_profile(png: &[u8]) -> Option<Vec<u8>> {
    let mut at = 8;
    while let Some(header) = png.get(at..at + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        let data = png.get(at + 8..at.checked_add(8)?.checked_add(len)?)?;
        match kind {
            b"IDAT" | b"IEND" => return None,
            b"iCCP" => {
                // The name, its end, then the compression method: 0, zlib.
                let name_end = data.iter().position(|&b| b == 0)?;
                let [0, zlib @ ..] = data.get(name_end + 1..)? else {
                    return None;
                };
                return fdeflate::decompress_to_vec_bounded(zlib, MAX_PROFILE_BYTES).ok();
            }
            // Length, type, data and CRC.
            _ => at += 12 + len,
        }
    }
    None
}

/// Converts a still image's pixels (8-bit RGB or RGBA, as decoding leaves
/// them) from `profile` to sRGB; see the module documentation for when
/// they are left as they are.
pub fn to_srgb(img: &mut DynamicImage, profile: &[u8]) {
    let layout = match img {
        DynamicImage::ImageRgb8(_) => Layout::Rgb,
        DynamicImage::ImageRgba8(_) => Layout::Rgba,
        _ => return,
    };
    if let Some(conversion) = SrgbConversion::new(profile, layout) {
        conversion.apply(img);
    }
}

/// A conversion from a profile to sRGB, made once and applied to many
/// images of one layout (an animation's RGBA frames).
pub struct SrgbConversion {
    transform: Transform,
    layout: Layout,
}

impl SrgbConversion {
    /// `None` where [`to_srgb`] would leave the pixels as they are.
    pub fn new(profile: &[u8], layout: Layout) -> Option<SrgbConversion> {
        if profile.len() > MAX_PROFILE_BYTES {
            return None;
        }
        let transform = transform_to_srgb(profile, layout)?;
        Some(SrgbConversion { transform, layout })
    }

    /// Converts `img`'s pixels in place, if it has this layout.
    pub fn apply(&self, img: &mut DynamicImage) {
        let pixels = match (img, self.layout) {
            (DynamicImage::ImageRgb8(buf), Layout::Rgb) => &mut **buf,
            (DynamicImage::ImageRgba8(buf), Layout::Rgba) => &mut **buf,
            _ => return,
        };
        // In runs through a small buffer, not a second copy of the image.
        let channels = if self.layout == Layout::Rgb { 3 } else { 4 };
        let mut out = vec![0u8; 4096 * channels];
        for run in pixels.chunks_mut(4096 * channels) {
            let out = &mut out[..run.len()];
            if self.transform.transform(run, out).is_err() {
                return;
            }
            run.copy_from_slice(out);
        }
    }
}

type Transform = std::sync::Arc<moxcms::Transform8BitExecutor>;

/// Converts CMYK pixels (4 bytes each, `inverted` when stored as Adobe's
/// files keep them, 255 for no ink) to sRGB through a CMYK `profile`, in
/// place: pixel i's RGB lands on bytes 3i..3i+3, and the buffer is cut to
/// 3 bytes a pixel. Gives `Ok(false)`, the pixels untouched, when the
/// profile does not parse, is not a CMYK profile or gives no transform, and
/// an error if the transform fails part of the way.
pub fn cmyk_to_srgb(pixels: &mut Vec<u8>, profile: &[u8], inverted: bool) -> Result<bool, String> {
    if profile.len() > MAX_PROFILE_BYTES {
        return Ok(false);
    }
    let Some(source) = ColorProfile::new_from_slice(profile).ok() else {
        return Ok(false);
    };
    if source.color_space != DataColorSpace::Cmyk {
        return Ok(false);
    }
    let srgb = ColorProfile::new_srgb();
    let Ok(transform) = source.create_transform_8bit(
        Layout::Rgba,
        &srgb,
        Layout::Rgb,
        TransformOptions::default(),
    ) else {
        return Ok(false);
    };
    // In runs through a small buffer: a run's RGB ends at or before its own
    // CMYK does, so it never covers CMYK not yet read.
    const RUN: usize = 4096;
    let count = pixels.len() / 4;
    let (mut cmyk, mut rgb) = (vec![0u8; RUN * 4], vec![0u8; RUN * 3]);
    for start in (0..count).step_by(RUN) {
        let n = RUN.min(count - start);
        let (cmyk, rgb) = (&mut cmyk[..n * 4], &mut rgb[..n * 3]);
        cmyk.copy_from_slice(&pixels[start * 4..(start + n) * 4]);
        if inverted {
            cmyk.iter_mut().for_each(|v| *v = 255 - *v);
        }
        if let Err(e) = transform.transform(cmyk, rgb) {
            if start == 0 {
                return Ok(false);
            }
            return Err(format!("the CMYK profile's transform failed: {e}"));
        }
        pixels[start * 3..(start + n) * 3].copy_from_slice(rgb);
    }
    pixels.truncate(count * 3);
    Ok(true)
}

/// The transform from an RGB `profile` to sRGB, or `None` where the pixels
/// stay as they are: a profile that does not parse or is not RGB, or one
/// that moves no colour of a 5x5x5 grid by more than a level (an embedded
/// sRGB profile, most often), which spares its cost.
fn transform_to_srgb(profile: &[u8], layout: Layout) -> Option<Transform> {
    let source = ColorProfile::new_from_slice(profile).ok()?;
    if source.color_space != DataColorSpace::Rgb {
        return None;
    }
    let srgb = ColorProfile::new_srgb();
    let options = TransformOptions::default();
    let probe = source
        .create_transform_8bit(Layout::Rgb, &srgb, Layout::Rgb, options)
        .ok()?;
    let levels = [0u8, 64, 128, 192, 255];
    let grid: Vec<u8> = levels
        .iter()
        .flat_map(|&r| levels.iter().flat_map(move |&g| levels.map(|b| [r, g, b])))
        .flatten()
        .collect();
    let mut moved = vec![0u8; grid.len()];
    probe.transform(&grid, &mut moved).ok()?;
    if grid.iter().zip(&moved).all(|(a, b)| a.abs_diff(*b) <= 1) {
        return None;
    }
    if layout == Layout::Rgb {
        return Some(probe);
    }
    source
        .create_transform_8bit(layout, &srgb, layout, options)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, RgbImage};

    /// A flat JPEG of `colour`, 4:4:4 at quality 100, carrying `profile`.
    fn jpeg_with_profile(colour: [u8; 3], profile: Option<Vec<u8>>) -> Vec<u8> {
        let img = RgbImage::from_pixel(64, 48, image::Rgb(colour));
        let mut out = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 100);
        if let Some(profile) = profile {
            encoder.set_icc_profile(profile).unwrap();
        }
        encoder
            .write_image(&img, 64, 48, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn centre(img: &DynamicImage) -> [u8; 3] {
        let rgb = img.to_rgb8();
        rgb.get_pixel(rgb.width() / 2, rgb.height() / 2).0
    }

    fn p3() -> Vec<u8> {
        ColorProfile::new_display_p3().encode().unwrap()
    }

    #[test]
    fn a_jpeg_profile_split_over_segments_is_joined_in_order() {
        // The encoder splits a profile over segments of at most 65519 bytes.
        let mut big = p3();
        big.resize(150_000, 7);
        let jpeg = jpeg_with_profile([10, 20, 30], Some(big.clone()));
        let at = |seq: u8| {
            jpeg.windows(14)
                .position(|w| w[..12] == *b"ICC_PROFILE\0" && w[12] == seq && w[13] == 3)
        };
        assert!(at(1).unwrap() < at(2).unwrap() && at(2).unwrap() < at(3).unwrap());
        assert_eq!(jpeg_profile(&jpeg).unwrap(), big);
        assert_eq!(jpeg_profile(&jpeg_with_profile([10, 20, 30], None)), None);
    }

    #[test]
    fn a_jpeg_profile_with_a_chunk_missing_is_not_used() {
        let mut big = p3();
        big.resize(150_000, 7);
        let mut jpeg = jpeg_with_profile([10, 20, 30], Some(big));
        // Renumber chunk 2 as a second chunk 3.
        let second = jpeg
            .windows(14)
            .position(|w| w[..12] == *b"ICC_PROFILE\0" && w[12] == 2)
            .unwrap();
        jpeg[second + 12] = 3;
        assert_eq!(jpeg_profile(&jpeg), None);
    }

    #[test]
    fn display_p3_pixels_are_converted_to_srgb() {
        // P3's green at 128 is sRGB's green at 131 with no red or blue: the
        // sRGB curve gives 0.2158 linear, P3-to-sRGB's matrix (from the two
        // spaces' primaries, D65 both) takes green to 1.0419 x 0.2158 =
        // 0.2248 and red and blue below zero, and 0.2248 is 131 in sRGB.
        // P3's white stays white.
        for (p3_colour, srgb) in [([0, 128, 0], [0, 131, 0]), ([255; 3], [255; 3])] {
            let jpeg = jpeg_with_profile(p3_colour, Some(p3()));
            let mut img = image::load_from_memory(&jpeg).unwrap();
            let before = centre(&img);
            to_srgb(&mut img, &jpeg_profile(&jpeg).unwrap());
            let after = centre(&img);
            for c in 0..3 {
                assert!(
                    after[c].abs_diff(srgb[c]) <= 1,
                    "{p3_colour:?} decoded as {before:?} became {after:?}, not {srgb:?}"
                );
            }
        }
    }

    #[test]
    fn a_linear_profile_with_srgb_primaries_only_changes_the_curve() {
        // Linear 128/255 = 0.502 is 0.7354 in sRGB's curve: 188.
        let mut linear = ColorProfile::new_srgb();
        let curve = moxcms::ToneReprCurve::Parametric(vec![1.0]);
        linear.red_trc = Some(curve.clone());
        linear.green_trc = Some(curve.clone());
        linear.blue_trc = Some(curve);
        linear.cicp = None;
        let mut img = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            5,
            5,
            image::Rgba([128, 128, 128, 77]),
        ));
        to_srgb(&mut img, &linear.encode().unwrap());
        let px = img.to_rgba8().get_pixel(2, 2).0;
        assert!(px[..3].iter().all(|&v| v.abs_diff(188) <= 1), "{px:?}");
        assert_eq!(px[3], 77, "alpha is kept");
    }

    #[test]
    fn srgb_grey_and_broken_profiles_leave_the_pixels_alone() {
        let original = DynamicImage::ImageRgb8(RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
        }));
        let srgb = ColorProfile::new_srgb().encode().unwrap();
        let grey = ColorProfile::new_gray_with_gamma(1.0).encode().unwrap();
        let mut cut = p3();
        cut.truncate(60);
        for (name, profile) in [
            ("sRGB", srgb),
            ("grey", grey),
            ("cut", cut),
            ("empty", Vec::new()),
        ] {
            let mut img = original.clone();
            to_srgb(&mut img, &profile);
            assert!(img == original, "{name}");
        }
    }

    #[test]
    fn a_png_profile_is_read_from_its_iccp_chunk() {
        let img = RgbImage::from_pixel(8, 8, image::Rgb([0, 128, 0]));
        let mut png = Vec::new();
        let mut encoder = image::codecs::png::PngEncoder::new(&mut png);
        encoder.set_icc_profile(p3()).unwrap();
        encoder
            .write_image(&img, 8, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(png_profile(&png).unwrap(), p3());
        let mut plain = Vec::new();
        image::codecs::png::PngEncoder::new(&mut plain)
            .write_image(&img, 8, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(png_profile(&plain), None);
    }

    #[test]
    fn a_png_profile_that_inflates_past_the_cap_is_dropped_unread() {
        // A chunk with its length and CRC.
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
            chunk.extend_from_slice(kind);
            chunk.extend_from_slice(data);
            let crc = crc32fast::hash(&chunk[4..]);
            chunk.extend_from_slice(&crc.to_be_bytes());
            chunk
        };
        let iccp = |profile: &[u8]| {
            let mut data = b"icc\0\0".to_vec();
            data.extend_from_slice(&fdeflate::compress_to_vec(profile));
            chunk(b"iCCP", &data)
        };
        let img = RgbImage::from_pixel(2, 2, image::Rgb([1, 2, 3]));
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&img, 2, 2, image::ExtendedColorType::Rgb8)
            .unwrap();
        // 64 MB of zeros in a 64 KB chunk, after the signature and IHDR
        // (8 + 25 bytes); alone, or after a first profile, which a decoder
        // that drops only the first would let through.
        let bomb = iccp(&vec![0u8; 64 << 20]);
        let with = |chunks: &[u8]| [&png[..33], chunks, &png[33..]].concat();
        let alone = with(&bomb);
        assert!(alone.len() < png.len() + (1 << 20));
        assert_eq!(png_profile(&alone), None);
        let second = with(&[iccp(&p3()), bomb].concat());
        assert_eq!(png_profile(&second), Some(p3()));
        // The decoder skips both; the image decodes as without them.
        let limits = crate::imaging::Limits::default();
        for file in [alone, second] {
            let decoded = crate::imaging::decode(&file, &limits, crate::imaging::Lead::Nothing);
            assert_eq!(decoded.unwrap().pixels.into_first_frame().to_rgb8(), img);
        }
    }
}
