//! Leaving out a progressive JPEG's last refinement scans when a decode at
//! reduced scale cannot show their bits.
//!
//! A progressive file often sends its AC coefficients first without their
//! lowest bits (successive approximation), then one refinement scan per
//! missing bit. Decoding at 1/2 or 1/4 scale, libjpeg-turbo's reduced
//! inverse DCTs average each block down to 4x4 or 2x2 samples, and each AC
//! coefficient moves such an average by a fixed fraction of its value. From
//! the quantisers, that bounds how far a sample can move when every AC
//! coefficient of a component keeps only the bits above bit `Al`:
//!
//! `(2^Al - 1) * sum over AC (u, v) of q(u, v) * W(u) * W(v)`
//!
//! in grey levels, where `W(u)` is the largest share of coefficient `u` in
//! one output sample. With bits missing, libjpeg-turbo also turns on block
//! smoothing, which estimates the first nine coefficients (in zigzag order)
//! of a block where they read zero, within the range the missing bits leave
//! open: their error can be twice as large, and the bound counts them
//! twice. A refinement scan is left out when the precision it starts from
//! already keeps that bound within [`LIMIT`] (chroma counted 1.772 times,
//! its largest weight in the conversion to RGB), and so is every later
//! refinement of the same component, as successive approximation requires.
//! First scans are always kept (a refinement depends on which coefficients
//! they made nonzero), and so are DC scans.
//!
//! Only files saved at the highest qualities qualify: at quality 100 (all
//! quantisers 1) a 1/4-scale decode can spare the luma's last refinement
//! scan, which libjpeg-turbo's progressive script puts last and which holds
//! about a seventh of such a file's bytes; at quality 95 nothing is spared.
//! A full-scale decode never qualifies.

use super::jpeg_dc::{ZIGZAG, define_quantisers, frame_header, scan_end, scan_header, segment};

/// The most a sample may move, in grey levels, before colour conversion and
/// rounding. At quality 100 and 1/4 scale the luma's last bit can move a
/// sample by 0.73 levels, 1.14 with block smoothing's worst case; the next
/// bit up, or quantisers of 2, would allow 2.3 or more.
pub const LIMIT: f64 = 1.5;

/// `jpeg` without the refinement scans that a decode at 1/`denom` scale can
/// spare (see the module documentation); `None` when it needs them all, or
/// is not a progressive JPEG whose segments parse (the caller then decodes
/// the original).
pub fn without_spare_refinements(jpeg: &[u8], denom: u32) -> Option<Vec<u8>> {
    if jpeg.get(..2)? != [0xff, 0xd8] || !matches!(denom, 2 | 4 | 8) {
        return None;
    }
    let coarsest = coarsest_precisions(jpeg, denom)?;
    if coarsest.iter().all(|&(_, al)| al == 0) {
        return None;
    }
    // The spans of the file to keep; copied only if a scan is left out.
    let mut kept: Vec<(usize, usize)> = vec![(0, 2)];
    let mut scans = 0;
    let mut i = 2;
    loop {
        // A marker without a length ends the walk (`segment` declines it):
        // the file is left whole.
        let (marker, start, segment_end) = segment(jpeg, i)?;
        if marker == 0xdb && scans > 0 {
            // New quantisers after the first scan: the bound no longer
            // describes the file.
            return None;
        }
        if marker != 0xda {
            kept.push((start, segment_end));
            if marker == 0xd9 {
                break;
            }
            i = segment_end;
            continue;
        }
        scans += 1;
        let scan = scan_header(jpeg.get(start + 4..segment_end)?)?;
        let end = scan_end(jpeg, segment_end)?;
        let high = scan.approx >> 4;
        let spare = scan.spectral_start > 0
            && high > 0
            && scan.components.len() == 1
            && coarsest
                .iter()
                .any(|&(id, al)| id == scan.components[0].0 && high <= al);
        if !spare {
            kept.push((start, end));
        }
        i = end;
    }
    let kept_bytes: usize = kept.iter().map(|(start, end)| end - start).sum();
    (kept_bytes < jpeg.len()).then(|| {
        let mut out = Vec::with_capacity(kept_bytes);
        for (start, end) in kept {
            out.extend_from_slice(&jpeg[start..end]);
        }
        out
    })
}

/// For each component (by id), the coarsest precision `Al` its AC
/// coefficients may stop at, from the quantisers and the frame defined
/// before the first scan; `None` unless the file is progressive (Huffman)
/// with one to three components and its segments parse.
fn coarsest_precisions(jpeg: &[u8], denom: u32) -> Option<Vec<(u8, u8)>> {
    let mut tables: [Option<[u16; 64]>; 4] = [None; 4];
    let mut frame: Option<Vec<(u8, usize, usize, usize)>> = None;
    let mut i = 2;
    loop {
        let (marker, start, end) = segment(jpeg, i)?;
        let body = jpeg.get(start + 4..end)?;
        match marker {
            0xdb => define_quantisers(body, &mut tables)?,
            // 12-bit samples are refused: the bound is in 8-bit grey levels.
            0xc2 => frame = Some(frame_header(body)?.components),
            0xc0 | 0xc1 | 0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf => return None,
            0xda | 0xd9 => break,
            _ => {}
        }
        i = end;
    }
    let frame = frame?;
    if frame.is_empty() || frame.len() > 3 {
        // Four components are CMYK or YCCK, converted some other way.
        return None;
    }
    if (1..frame.len()).any(|c| frame[..c].iter().any(|k| k.0 == frame[c].0)) {
        // Two components with one id: a scan's id would be ambiguous.
        return None;
    }
    let (h_max, v_max) = frame
        .iter()
        .fold((1, 1), |(h, v), c| (h.max(c.1), v.max(c.2)));
    let least = 8 / denom as usize;
    frame
        .iter()
        .enumerate()
        .map(|(index, &(id, h, v, table))| {
            let quantisers = tables.get(table)?.as_ref()?;
            let size = idct_size(least, (h_max, v_max), (h, v));
            let colour = if index == 0 { 1.0 } else { 1.772 };
            let per_bit = colour * bound(quantisers, size);
            let al = (0..=13u8)
                .take_while(|&al| ((1u32 << al) - 1) as f64 * per_bit <= LIMIT)
                .last()
                .unwrap_or(0);
            Some((id, al))
        })
        .collect()
}

/// The inverse DCT size libjpeg-turbo uses for a component: the smallest
/// (`least`, 8 / the scale's denominator) doubled while the component's
/// subsampling allows, so that chroma comes out at the luma's size without
/// upsampling (its `jpeg_core_output_dimensions`).
fn idct_size(least: usize, (h_max, v_max): (usize, usize), (h, v): (usize, usize)) -> usize {
    let mut size = least;
    while size < 8
        && (h_max * least).is_multiple_of(h * size * 2)
        && (v_max * least).is_multiple_of(v * size * 2)
    {
        size *= 2;
    }
    size
}

/// How far, in grey levels, one unit of lost precision in every AC
/// coefficient can move a sample of a block decoded at `size` x `size`,
/// counting twice the nine coefficients that block smoothing estimates.
fn bound(quantisers: &[u16; 64], size: usize) -> f64 {
    let w = weights(size);
    ZIGZAG
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, &natural)| {
            let (u, v) = (natural % 8, natural / 8);
            let smoothed = if k <= 9 { 2.0 } else { 1.0 };
            smoothed * quantisers[natural] as f64 * w[u] * w[v]
        })
        .sum()
}

/// `W(u)` for each frequency `u`: the largest share of a coefficient in one
/// sample of a block decoded at `size` samples across, each the average of
/// `8 / size` pixels of the full inverse DCT, in which pixel `x` gets
/// `C(u) / 2 * cos((2x + 1) u pi / 16)` of coefficient `u`.
fn weights(size: usize) -> [f64; 8] {
    let span = 8 / size;
    let mut w = [0.0; 8];
    for (u, weight) in w.iter_mut().enumerate() {
        let c = if u == 0 {
            std::f64::consts::FRAC_1_SQRT_2
        } else {
            1.0
        };
        *weight = (0..size)
            .map(|sample| {
                let sum: f64 = (sample * span..(sample + 1) * span)
                    .map(|x| ((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI / 16.0).cos())
                    .sum();
                (c / 2.0 * sum / span as f64).abs()
            })
            .fold(0.0, f64::max);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_the_dct_basis_averaged_over_each_sample() {
        // Full scale: the basis itself, at most C(u) / 2 (reached where a
        // sample falls on a peak of the cosine).
        let full = weights(8);
        assert!((full[0] - 0.5f64.sqrt() / 2.0).abs() < 1e-12);
        assert!(
            full[1..].iter().all(|w| (0.35..=0.5).contains(w)),
            "{full:?}"
        );
        assert!((full[4] - full[0]).abs() < 1e-12, "{full:?}");
        // One sample per block: the DC term alone.
        let eighth = weights(1);
        assert!((eighth[0] - full[0]).abs() < 1e-12);
        assert!(eighth[1..].iter().all(|w| w.abs() < 1e-12), "{eighth:?}");
        // Two samples across: even frequencies cancel over each half.
        let quarter = weights(2);
        for u in [2, 4, 6] {
            assert!(quarter[u] < 1e-12, "{quarter:?}");
        }
        assert!((quarter[1] - 0.3204).abs() < 1e-3, "{quarter:?}");
    }

    #[test]
    fn chroma_is_decoded_at_a_larger_size_where_it_is_subsampled() {
        // 4:2:0 at 1/4: luma 2x2, chroma 4x4; at 1/8: 1x1 and 2x2.
        assert_eq!(idct_size(2, (2, 2), (2, 2)), 2);
        assert_eq!(idct_size(2, (2, 2), (1, 1)), 4);
        assert_eq!(idct_size(1, (2, 2), (1, 1)), 2);
        // 4:2:2 chroma: halved across only, so it stays at the luma's size.
        assert_eq!(idct_size(2, (2, 1), (1, 1)), 2);
        // Full scale stays 8.
        assert_eq!(idct_size(8, (2, 2), (1, 1)), 8);
    }

    #[test]
    fn only_quality_100_spares_bits_and_only_at_reduced_scale() {
        let ones = [1u16; 64];
        // Quarter scale, luma: one bit of every AC coefficient moves a sample
        // by 0.73 levels, 1.14 with smoothing's estimates; two bits (3 units)
        // by more than the limit.
        let quarter = bound(&ones, 2);
        assert!((quarter - 1.14).abs() < 0.01, "{quarter}");
        assert!(quarter <= LIMIT && 3.0 * quarter > LIMIT, "{quarter}");
        // Chroma is counted 1.772 times: none of it is spared, even at the
        // luma's size (4:4:4; subsampled chroma is decoded larger).
        assert!(1.772 * bound(&ones, 2) > LIMIT);
        // Half and full scale: even one bit may move a sample too far.
        assert!(bound(&ones, 4) > LIMIT);
        assert!(bound(&ones, 8) > LIMIT);
        // Quantisers of 2 (quality 95 and below have larger ones) at 1/4.
        assert!(bound(&[2u16; 64], 2) > LIMIT);
    }
}
