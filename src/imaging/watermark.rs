//! Text and image watermarks. (Owned by the watermark helper; placeholder.)

use image::DynamicImage;

use crate::action::TextWatermark;

/// Draws `wm.text` tiled across the whole image in `wm.color` at `wm.opacity`.
pub fn draw_text(img: &mut DynamicImage, wm: &TextWatermark) {
    let _ = (img, wm);
}

/// Composites `overlay` onto `img` with its top-left corner at (`left`, `top`),
/// respecting the overlay's alpha and scaling it by `opacity`.
pub fn composite(img: &mut DynamicImage, overlay: &DynamicImage, left: u32, top: u32, opacity: f32) {
    let _ = (img, overlay, left, top, opacity);
}
