//! Attention-based crop placement for gravity 9. (Owned by the smartcrop helper; placeholder.)

use image::DynamicImage;

/// The top-left corner of the most interesting `width` x `height` region of `img`.
/// `width` and `height` are already clamped to the image.
pub fn attention_origin(img: &DynamicImage, width: u32, height: u32) -> (u32, u32) {
    ((img.width() - width) / 2, (img.height() - height) / 2)
}
