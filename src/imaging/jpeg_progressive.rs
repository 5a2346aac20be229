//! Entropy decoding of progressive JPEGs into DCT coefficients.
//!
//! Used for a narrow region of a progressive file at full scale (see
//! `decode::decode_jpeg`), where it replaces libjpeg-turbo's entropy
//! decoding and transforms only the region, as libjpeg-turbo would, with
//! the same pixels. Coefficients are kept per
//! block in zigzag order, with a mask of the nonzero ones, so that a
//! refinement scan visits only those: the correction bits of a run are read
//! together and deposited onto the nonzero positions (`pdep` where the CPU
//! has BMI2), and only coefficients whose bit is set are touched.
//!
//! Damaged or unsupported files give `None` (the caller decodes with
//! libjpeg-turbo); nothing here panics on input.

use super::jpeg_dc::{
    BitReader, FrameHeader, Huffman, ZIGZAG, define_quantisers, frame_header, scan_end,
    scan_header, segment, ycc_to_rgb,
};

/// One component's coefficients over its whole block grid (MCU-padded).
pub struct Component {
    pub id: u8,
    pub h: usize,
    pub v: usize,
    /// Quantiser table of the component.
    pub table: usize,
    /// Blocks holding image data (a single-component scan covers these).
    pub blocks_wide: usize,
    pub blocks_high: usize,
    /// Blocks per row of `coefs`.
    pub stride: usize,
    /// Zigzag order.
    pub coefs: Vec<[i16; 64]>,
    nonzero: Vec<u64>,
}

/// A frame's coefficients and quantisers.
pub struct Coefficients {
    pub width: usize,
    pub height: usize,
    pub components: Vec<Component>,
    /// Natural order, per table.
    pub quantisers: [[u16; 64]; 4],
}

/// Decodes every scan of `jpeg`; `None` unless it is an 8-bit progressive
/// Huffman-coded file with one or three components, at most `max_blocks`
/// blocks in all, whose scans parse.
pub fn decode(jpeg: &[u8], max_blocks: usize) -> Option<Coefficients> {
    if jpeg.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    let mut dc: [Option<Huffman>; 4] = Default::default();
    let mut ac: [Option<Huffman>; 4] = Default::default();
    let mut quantisers: [Option<[u16; 64]>; 4] = [None; 4];
    let mut frame: Option<Coefficients> = None;
    let mut interval = 0usize;
    let mut scans = 0usize;
    let mut i = 2;
    loop {
        let (marker, start, end) = segment(jpeg, i)?;
        if marker == 0xd9 {
            break;
        }
        let body = jpeg.get(start + 4..end)?;
        match marker {
            0xc4 => define_huffman(body, &mut dc, &mut ac)?,
            // libjpeg takes a component's quantisers at its first scan; a
            // table redefined after the first scan is left to it.
            0xdb if scans > 0 => return None,
            0xdb => define_quantisers(body, &mut quantisers)?,
            0xdd => interval = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize,
            0xc2 if frame.is_none() => frame = Some(parse_frame(body, max_blocks)?),
            0xc0..=0xcf if marker != 0xc4 && marker != 0xc8 && marker != 0xcc => return None,
            0xda => {
                let frame = frame.as_mut()?;
                let header = scan_header(body)?;
                let mut slots = Vec::with_capacity(header.components.len());
                for &(id, _, _) in &header.components {
                    slots.push(frame.components.iter().position(|c| c.id == id)?);
                }
                let (ss, se) = (header.spectral_start as usize, header.spectral_end as usize);
                let (ah, al) = ((header.approx >> 4) as u32, (header.approx & 15) as u32);
                scans += 1;
                let repeated = (1..slots.len()).any(|n| slots[..n].contains(&slots[n]));
                // A file of thousands of scans would walk every block each
                // time: past [`MAX_SCANS`], libjpeg-turbo refuses it too.
                if se > 63
                    || ss > se
                    || al > 13
                    || slots.is_empty()
                    || repeated
                    || scans > MAX_SCANS
                {
                    return None;
                }
                let end_of_data = if ss == 0 {
                    if se != 0 {
                        return None;
                    }
                    let huffs: Vec<Option<&Huffman>> = header
                        .components
                        .iter()
                        .map(|&(_, t, _)| dc.get(t as usize).and_then(Option::as_ref))
                        .collect();
                    dc_scan(jpeg, end, frame, &slots, &huffs, ah, al, interval)?
                } else {
                    if slots.len() != 1 {
                        return None;
                    }
                    let huff = ac.get(header.components[0].2 as usize)?.as_ref()?;
                    let component = frame.components.get_mut(slots[0])?;
                    ac_scan(
                        jpeg,
                        end,
                        component,
                        AcScan {
                            huff,
                            band: (ss, se),
                            approx: (ah, al),
                            interval,
                        },
                    )?
                };
                i = scan_end(jpeg, end_of_data)?;
                continue;
            }
            _ => {}
        }
        i = end;
    }
    let mut frame = frame?;
    // A table the file never defines reads as zeros.
    frame.quantisers = quantisers.map(|t| t.unwrap_or([0; 64]));
    Some(frame)
}

fn define_huffman(
    mut body: &[u8],
    dc: &mut [Option<Huffman>; 4],
    ac: &mut [Option<Huffman>; 4],
) -> Option<()> {
    while let Some(&head) = body.first() {
        let (class, id) = (head >> 4, (head & 15) as usize);
        let counts: [u8; 16] = body.get(1..17)?.try_into().ok()?;
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let table = Huffman::new(&counts, body.get(17..17 + total)?)?;
        match class {
            0 => *dc.get_mut(id)? = Some(table),
            1 => *ac.get_mut(id)? = Some(table),
            _ => return None,
        }
        body = &body[17 + total..];
    }
    Some(())
}

/// The most scans a file may have, here and in libjpeg-turbo (its scan
/// limit, which it checks as it reaches each scan): each scan is a pass
/// over the coefficients, so a 116 KB file of 4000x4000 pixels that
/// repeats one scan a thousand times took 9.8 s, and at this limit takes
/// about 1 s before it is refused. Encoders write about ten; `zune-jpeg`
/// (the image crate's decoder) refuses more than 100 too.
pub(super) const MAX_SCANS: usize = 100;

fn parse_frame(body: &[u8], max_blocks: usize) -> Option<Coefficients> {
    let FrameHeader {
        width,
        height,
        components: parts,
    } = frame_header(body)?;
    if width == 0 || height == 0 || !(parts.len() == 1 || parts.len() == 3) {
        return None;
    }
    let h_max = parts.iter().map(|p| p.1).max()?;
    let v_max = parts.iter().map(|p| p.2).max()?;
    let mcus_wide = width.div_ceil(8 * h_max);
    let mcus_high = height.div_ceil(8 * v_max);
    let blocks: usize = parts
        .iter()
        .map(|p| mcus_wide * p.1 * mcus_high * p.2)
        .sum();
    if blocks > max_blocks {
        return None;
    }
    let components = parts
        .into_iter()
        .map(|(id, h, v, table)| {
            let n = mcus_wide * h * mcus_high * v;
            Component {
                id,
                h,
                v,
                table,
                blocks_wide: (width * h).div_ceil(h_max).div_ceil(8),
                blocks_high: (height * v).div_ceil(v_max).div_ceil(8),
                stride: mcus_wide * h,
                coefs: vec![[0i16; 64]; n],
                nonzero: vec![0u64; n],
            }
        })
        .collect();
    Some(Coefficients {
        width,
        height,
        components,
        quantisers: [[0; 64]; 4],
    })
}

/// Decodes one DC scan starting at `from`; returns where its data ends.
#[allow(clippy::too_many_arguments)]
fn dc_scan(
    jpeg: &[u8],
    from: usize,
    frame: &mut Coefficients,
    slots: &[usize],
    huffs: &[Option<&Huffman>],
    ah: u32,
    al: u32,
    interval: usize,
) -> Option<usize> {
    let mut bits = BitReader::new(jpeg, from);
    let mut predictors = [0i32; 4];
    let single = slots.len() == 1;
    let h_max = frame.components.iter().map(|c| c.h).max()?;
    let v_max = frame.components.iter().map(|c| c.v).max()?;
    let (units_wide, units_high) = if single {
        let c = frame.components.get(slots[0])?;
        (c.blocks_wide, c.blocks_high)
    } else {
        (
            frame.width.div_ceil(8 * h_max),
            frame.height.div_ceil(8 * v_max),
        )
    };
    let mut unit = 0usize;
    for uy in 0..units_high {
        for ux in 0..units_wide {
            if interval > 0 && unit > 0 && unit.is_multiple_of(interval) {
                bits.restart()?;
                predictors = [0; 4];
            }
            unit += 1;
            for (slot, &index) in slots.iter().enumerate() {
                let c = frame.components.get_mut(index)?;
                let (h, v) = if single { (1, 1) } else { (c.h, c.v) };
                for by in 0..v {
                    for bx in 0..h {
                        let at = (uy * v + by) * c.stride + ux * h + bx;
                        let block = c.coefs.get_mut(at)?;
                        if ah == 0 {
                            let size = (*huffs.get(slot)?)?.decode(&mut bits)?;
                            let diff = bits.receive_extend(size)?;
                            predictors[slot] = predictors[slot].wrapping_add(diff);
                            block[0] = predictors[slot].wrapping_shl(al) as i16;
                        } else if bits.bit() {
                            block[0] |= (1i32 << al) as i16;
                        }
                    }
                }
            }
        }
    }
    (!bits.read_past_end()).then_some(bits.position())
}

/// What an AC scan header says: its Huffman table, its band of
/// coefficients (`ss..=se`), its bit positions (`ah`, `al`) and the restart
/// interval in blocks.
#[derive(Clone, Copy)]
struct AcScan<'a> {
    huff: &'a Huffman,
    band: (usize, usize),
    approx: (u32, u32),
    interval: usize,
}

/// Decodes one AC scan of `c` starting at `from`; returns where its data
/// ends.
fn ac_scan(jpeg: &[u8], from: usize, c: &mut Component, scan: AcScan) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("bmi2") {
        // SAFETY: BMI2 was detected at run time.
        return unsafe { ac_scan_bmi2(jpeg, from, c, scan) };
    }
    ac_scan_with::<false>(jpeg, from, c, scan)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi2")]
fn ac_scan_bmi2(jpeg: &[u8], from: usize, c: &mut Component, scan: AcScan) -> Option<usize> {
    ac_scan_with::<true>(jpeg, from, c, scan)
}

#[inline(always)]
fn ac_scan_with<const BMI2: bool>(
    jpeg: &[u8],
    from: usize,
    c: &mut Component,
    scan: AcScan,
) -> Option<usize> {
    let AcScan {
        huff,
        band: (ss, se),
        approx: (ah, al),
        interval,
    } = scan;
    let mut bits = BitReader::new(jpeg, from);
    let band = (!0u64 >> (63 - se)) & (!0u64 << ss);
    let p1 = (1i32 << al) as i16;
    let m1 = (-1i32 << al) as i16;
    let deposit = if BMI2 { deposit_pdep } else { deposit_plain };
    let mut eobrun = 0u32;
    let mut n = 0usize;
    for by in 0..c.blocks_high {
        for bx in 0..c.blocks_wide {
            if interval > 0 && n > 0 && n.is_multiple_of(interval) {
                bits.restart()?;
                eobrun = 0;
            }
            n += 1;
            let at = by * c.stride + bx;
            let block = c.coefs.get_mut(at)?;
            let nonzero = c.nonzero.get_mut(at)?;
            if ah == 0 {
                if eobrun > 0 {
                    eobrun -= 1;
                    continue;
                }
                let mut k = ss;
                while k <= se {
                    let symbol = huff.decode(&mut bits)?;
                    let (r, s) = ((symbol >> 4) as usize, symbol & 15);
                    if s != 0 {
                        k += r;
                        let value = bits.receive_extend(s)?;
                        if k > se {
                            return None;
                        }
                        block[k] = value.wrapping_shl(al) as i16;
                        if value != 0 {
                            *nonzero |= 1 << k;
                        }
                        k += 1;
                    } else if r == 15 {
                        k += 16;
                    } else {
                        eobrun = (1 << r) - 1 + bits.take(r as u32);
                        break;
                    }
                }
            } else {
                let mut nz = *nonzero;
                let mut k = ss;
                if eobrun == 0 {
                    while k <= se {
                        let symbol = huff.decode(&mut bits)?;
                        let (r, s) = (symbol >> 4, symbol & 15);
                        let mut value = 0i16;
                        if s > 1 {
                            return None;
                        }
                        if s != 0 {
                            value = if bits.bit() { p1 } else { m1 };
                        } else if r != 15 {
                            eobrun = (1 << r) + bits.take(r);
                            break;
                        }
                        let rest = band & (!0u64 << k);
                        // The (r + 1)th coefficient still zero at or after k.
                        let mut zeros = !nz & rest;
                        for _ in 0..r {
                            zeros &= zeros.wrapping_sub(1);
                        }
                        if zeros == 0 {
                            deposit(&mut bits, block, nz & rest, p1, m1);
                            k = se + 1;
                            break;
                        }
                        let target = zeros.trailing_zeros() as usize;
                        deposit(&mut bits, block, nz & rest & ((1 << target) - 1), p1, m1);
                        if s != 0 {
                            block[target] = value;
                            nz |= 1 << target;
                        }
                        k = target + 1;
                    }
                }
                if eobrun > 0 {
                    if k <= se {
                        deposit(&mut bits, block, nz & band & (!0u64 << k), p1, m1);
                    }
                    eobrun -= 1;
                }
                *nonzero = nz;
            }
        }
    }
    (!bits.read_past_end()).then_some(bits.position())
}

/// Reads one correction bit per coefficient in `mask` (lowest position
/// first) and applies those that are set.
#[inline(always)]
fn deposit_plain(bits: &mut BitReader<'_>, block: &mut [i16; 64], mut mask: u64, p1: i16, m1: i16) {
    while mask != 0 {
        let k = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        if bits.bit() {
            correct(&mut block[k], p1, m1);
        }
    }
}

/// [`deposit_plain`], up to 32 bits at a time, deposited onto the mask's
/// positions with BMI2's `pdep`. Only reached from [`ac_scan_bmi2`].
#[inline(always)]
fn deposit_pdep(bits: &mut BitReader<'_>, block: &mut [i16; 64], mut mask: u64, p1: i16, m1: i16) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::_pdep_u64;
        debug_assert!(std::arch::is_x86_feature_detected!("bmi2"));
        while mask != 0 {
            let n = mask.count_ones().min(32);
            let word = bits.take(n);
            // SAFETY: this runs inside `ac_scan_bmi2`, on a CPU with BMI2.
            let part = unsafe { _pdep_u64((1u64 << n) - 1, mask) };
            mask &= !part;
            // The first bit read goes to the lowest position.
            // SAFETY: as above.
            let mut set = unsafe { _pdep_u64(u64::from(word.reverse_bits() >> (32 - n)), part) };
            while set != 0 {
                let k = set.trailing_zeros() as usize;
                set &= set - 1;
                correct(&mut block[k], p1, m1);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    deposit_plain(bits, block, mask, p1, m1)
}

/// Adds a correction bit to a coefficient that does not have it yet.
#[inline(always)]
fn correct(coef: &mut i16, p1: i16, m1: i16) {
    if *coef & p1 == 0 {
        *coef = coef.wrapping_add(if *coef >= 0 { p1 } else { m1 });
    }
}

/// The RGB pixels of the region `(x, y, width, height)` of a 4:2:0, 4:2:2,
/// 4:4:4 or grey frame, computed as libjpeg-turbo computes its own: integer
/// "islow" inverse DCT, "fancy" (triangle) chroma upsampling, fixed-point
/// colour conversion. Only the blocks the region needs are transformed.
pub fn region_rgb(c: &Coefficients, (x, y, w, h): (usize, usize, usize, usize)) -> Option<Vec<u8>> {
    if w == 0 || h == 0 || x + w > c.width || y + h > c.height {
        return None;
    }
    let h_max = c.components.iter().map(|k| k.h).max()?;
    let v_max = c.components.iter().map(|k| k.v).max()?;
    let mut planes = Vec::with_capacity(c.components.len());
    for k in &c.components {
        let (fx, fy) = (h_max / k.h, v_max / k.v);
        if !matches!((fx, fy), (1, 1) | (2, 1) | (2, 2)) || h_max % k.h != 0 || v_max % k.v != 0 {
            return None;
        }
        // The component's samples under the region, one more on each side
        // for the upsampler's neighbours (clamped to the component).
        let (comp_w, comp_h) = (c.width.div_ceil(fx), c.height.div_ceil(fy));
        let x0 = (x / fx).saturating_sub(1);
        let y0 = (y / fy).saturating_sub(1);
        let x1 = ((x + w).div_ceil(fx) + 1).min(comp_w);
        let y1 = ((y + h).div_ceil(fy) + 1).min(comp_h);
        let plane = samples(k, &c.quantisers[k.table], (x0, y0, x1, y1))?;
        planes.push((plane, (x0, y0, x1, y1), fx, fy, comp_w, comp_h));
    }
    let mut rgb = vec![0u8; w * h * 3];
    for row in 0..h {
        let py = y + row;
        let mut values = [[0u8; 3]; 1];
        for col in 0..w {
            let px = x + col;
            for (n, (plane, (x0, y0, x1, _), fx, fy, comp_w, comp_h)) in planes.iter().enumerate() {
                let stride = x1 - x0;
                let at =
                    |sx: usize, sy: usize| -> i32 { plane[(sy - y0) * stride + (sx - x0)] as i32 };
                values[0][n] = match (fx, fy) {
                    (1, 1) => at(px, py) as u8,
                    (2, 1) => fancy_h2(px, py, *comp_w, &at),
                    _ => fancy_h2v2(px, py, (*comp_w, *comp_h), &at),
                };
            }
            let out = &mut rgb[(row * w + col) * 3..][..3];
            if planes.len() == 1 {
                out.fill(values[0][0]);
            } else {
                out.copy_from_slice(&ycc_to_rgb(values[0][0], values[0][1], values[0][2]));
            }
        }
    }
    Some(rgb)
}

/// libjpeg's h2v1 fancy upsampling at output column `px`.
fn fancy_h2(px: usize, py: usize, comp_w: usize, at: &dyn Fn(usize, usize) -> i32) -> u8 {
    let i = px / 2;
    let this = at(i, py) * 3;
    let v = if px.is_multiple_of(2) {
        if i == 0 {
            at(i, py) * 4 + 2
        } else {
            this + at(i - 1, py) + 1
        }
    } else if i + 1 >= comp_w {
        at(i, py) * 4 + 1
    } else {
        this + at(i + 1, py) + 2
    };
    (v >> 2) as u8
}

/// libjpeg's h2v2 fancy upsampling at output pixel `(px, py)`.
fn fancy_h2v2(
    px: usize,
    py: usize,
    (comp_w, comp_h): (usize, usize),
    at: &dyn Fn(usize, usize) -> i32,
) -> u8 {
    let (i, j) = (px / 2, py / 2);
    // The nearer row: above for an even output row, below for an odd one,
    // the row itself at the image's edge.
    let near = if py.is_multiple_of(2) {
        j.saturating_sub(1)
    } else {
        (j + 1).min(comp_h - 1)
    };
    let colsum = |c: usize| at(c, j) * 3 + at(c, near);
    let this = colsum(i);
    let v = if px.is_multiple_of(2) {
        if i == 0 {
            this * 4 + 8
        } else {
            this * 3 + colsum(i - 1) + 8
        }
    } else if i + 1 >= comp_w {
        this * 4 + 7
    } else {
        this * 3 + colsum(i + 1) + 7
    };
    (v >> 4) as u8
}

/// The component's samples in `(x0, y0)..(x1, y1)`, from the blocks that
/// cover them.
fn samples(
    k: &Component,
    q: &[u16; 64],
    (x0, y0, x1, y1): (usize, usize, usize, usize),
) -> Option<Vec<u8>> {
    let stride = x1 - x0;
    let mut plane = vec![0u8; stride * (y1 - y0)];
    for by in y0 / 8..y1.div_ceil(8) {
        for bx in x0 / 8..x1.div_ceil(8) {
            let block = k.coefs.get(by * k.stride + bx)?;
            let pixels = idct_islow(block, q);
            for yy in 0..8 {
                let sy = by * 8 + yy;
                if sy < y0 || sy >= y1 {
                    continue;
                }
                for xx in 0..8 {
                    let sx = bx * 8 + xx;
                    if sx >= x0 && sx < x1 {
                        plane[(sy - y0) * stride + sx - x0] = pixels[yy * 8 + xx];
                    }
                }
            }
        }
    }
    Some(plane)
}

/// libjpeg's accurate integer inverse DCT (`jpeg_idct_islow`).
fn idct_islow(block: &[i16; 64], q: &[u16; 64]) -> [u8; 64] {
    const CONST_BITS: i32 = 13;
    const PASS1_BITS: i32 = 2;
    let mut natural = [0i64; 64];
    for (z, &n) in ZIGZAG.iter().enumerate() {
        natural[n] = block[z] as i64 * q[n] as i64;
    }
    let descale = |x: i64, n: i32| (x + (1 << (n - 1))) >> n;
    // Columns, keeping PASS1_BITS of extra precision (a column with no AC
    // terms is its DC term, as libjpeg shortcuts it).
    let mut ws = [0i64; 64];
    for col in 0..8 {
        let d: [i64; 8] = std::array::from_fn(|r| natural[r * 8 + col]);
        let out = if d[1..].iter().all(|&v| v == 0) {
            [d[0] << PASS1_BITS; 8]
        } else {
            idct_1d(d).map(|v| descale(v, CONST_BITS - PASS1_BITS))
        };
        for (r, v) in out.into_iter().enumerate() {
            ws[r * 8 + col] = v;
        }
    }
    // Rows, to samples.
    let mut pixels = [0u8; 64];
    for row in 0..8 {
        let d: [i64; 8] = std::array::from_fn(|c| ws[row * 8 + c]);
        for (c, v) in idct_1d(d).into_iter().enumerate() {
            pixels[row * 8 + c] =
                (descale(v, CONST_BITS + PASS1_BITS + 3) + 128).clamp(0, 255) as u8;
        }
    }
    pixels
}

/// One pass of `jpeg_idct_islow` over eight inputs, before descaling.
fn idct_1d(d: [i64; 8]) -> [i64; 8] {
    const CONST_BITS: i32 = 13;
    const F0_298: i64 = 2446;
    const F0_390: i64 = 3196;
    const F0_541: i64 = 4433;
    const F0_765: i64 = 6270;
    const F0_899: i64 = 7373;
    const F1_175: i64 = 9633;
    const F1_501: i64 = 12299;
    const F1_847: i64 = 15137;
    const F1_961: i64 = 16069;
    const F2_053: i64 = 16819;
    const F2_562: i64 = 20995;
    const F3_072: i64 = 25172;
    // Even part.
    let z1 = (d[2] + d[6]) * F0_541;
    let tmp2 = z1 + d[6] * -F1_847;
    let tmp3 = z1 + d[2] * F0_765;
    let tmp0 = (d[0] + d[4]) << CONST_BITS;
    let tmp1 = (d[0] - d[4]) << CONST_BITS;
    let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
    // Odd part.
    let (t0, t1, t2, t3) = (d[7], d[5], d[3], d[1]);
    let (z1, z2, z3, z4) = (t0 + t3, t1 + t2, t0 + t2, t1 + t3);
    let z5 = (z3 + z4) * F1_175;
    let (t0, t1, t2, t3) = (t0 * F0_298, t1 * F2_053, t2 * F3_072, t3 * F1_501);
    let (z1, z2) = (z1 * -F0_899, z2 * -F2_562);
    let (z3, z4) = (z3 * -F1_961 + z5, z4 * -F0_390 + z5);
    let (t0, t1, t2, t3) = (t0 + z1 + z3, t1 + z2 + z4, t2 + z2 + z3, t3 + z1 + z4);
    [
        tmp10 + t3,
        tmp11 + t2,
        tmp12 + t1,
        tmp13 + t0,
        tmp13 - t0,
        tmp12 - t1,
        tmp11 - t2,
        tmp10 - t3,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(name: &str) -> Option<Vec<u8>> {
        std::fs::read(format!(
            "{}/../shared/corpus/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .ok()
    }

    #[test]
    fn decodes_the_progressive_corpus_photo_and_times_it() {
        let Some(jpeg) = corpus("Elephants_3840x2160.jpg") else {
            return;
        };
        let started = std::time::Instant::now();
        let coefficients = decode(&jpeg, 1 << 22).expect("decodes");
        eprintln!("decoded in {:?}", started.elapsed());
        assert_eq!((coefficients.width, coefficients.height), (3840, 2160));
        // Every block of the luma has its DC term, and most have AC terms.
        let luma = &coefficients.components[0];
        let with_ac = luma.nonzero.iter().filter(|&&m| m & !1 != 0).count();
        assert!(with_ac > luma.coefs.len() / 2, "{with_ac}");
    }

    /// RGB from coefficients: float IDCT, chroma repeated (no fancy
    /// upsampling), JFIF colour conversion.
    fn render(c: &Coefficients) -> Vec<u8> {
        let h_max = c.components.iter().map(|k| k.h).max().unwrap();
        let v_max = c.components.iter().map(|k| k.v).max().unwrap();
        let basis: Vec<f64> = (0..64)
            .map(|i| {
                let (x, u) = (i / 8, i % 8);
                let cu = if u == 0 {
                    std::f64::consts::FRAC_1_SQRT_2
                } else {
                    1.0
                };
                cu * ((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI / 16.0).cos() / 2.0
            })
            .collect();
        let planes: Vec<(Vec<f64>, usize, usize, usize)> = c
            .components
            .iter()
            .map(|k| {
                let q = &c.quantisers[k.table];
                let width = k.stride * 8;
                let mut plane = vec![0.0; k.coefs.len() * 64];
                for (b, block) in k.coefs.iter().enumerate() {
                    let (bx, by) = (b % k.stride, b / k.stride);
                    let mut f = [0.0; 64];
                    for (z, &natural) in ZIGZAG.iter().enumerate() {
                        f[natural] = block[z] as f64 * q[natural] as f64;
                    }
                    for y in 0..8 {
                        for x in 0..8 {
                            let mut sum = 0.0;
                            for v in 0..8 {
                                for u in 0..8 {
                                    sum += f[v * 8 + u] * basis[x * 8 + u] * basis[y * 8 + v];
                                }
                            }
                            plane[(by * 8 + y) * width + bx * 8 + x] = sum + 128.0;
                        }
                    }
                }
                (plane, width, h_max / k.h, v_max / k.v)
            })
            .collect();
        let mut rgb = Vec::with_capacity(c.width * c.height * 3);
        for y in 0..c.height {
            for x in 0..c.width {
                let at = |p: &(Vec<f64>, usize, usize, usize)| p.0[(y / p.3) * p.1 + x / p.2];
                let luma = at(&planes[0]);
                let (cb, cr) = (at(&planes[1]) - 128.0, at(&planes[2]) - 128.0);
                for v in [
                    luma + 1.402 * cr,
                    luma - 0.344136 * cb - 0.714136 * cr,
                    luma + 1.772 * cb,
                ] {
                    rgb.push(v.round().clamp(0.0, 255.0) as u8);
                }
            }
        }
        rgb
    }

    #[test]
    fn coefficients_render_to_libjpeg_turbos_picture() {
        let jpeg = crate::imaging::tests::fixture("wood-progressive-1280.jpg");
        let ours = render(&decode(&jpeg, 1 << 20).unwrap());
        let image: turbojpeg::Image<Vec<u8>> =
            turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::RGB).unwrap();
        let mse = ours
            .iter()
            .zip(&image.pixels)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            / ours.len() as f64;
        let psnr = 10.0 * (255.0f64 * 255.0 / mse).log10();
        // Repeated chroma instead of libjpeg's interpolation costs a few dB;
        // a wrong coefficient anywhere costs far more.
        eprintln!("PSNR {psnr:.1} dB");
        assert!(psnr > 40.0, "{psnr:.1} dB");
    }

    #[test]
    fn a_region_matches_libjpeg_turbos_decode_of_it() {
        let jpeg = crate::imaging::tests::fixture("wood-progressive-1280.jpg");
        let c = decode(&jpeg, 1 << 20).unwrap();
        let whole: turbojpeg::Image<Vec<u8>> =
            turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::RGB).unwrap();
        for region in [(0, 0, 1280, 960), (490, 0, 300, 960), (333, 17, 101, 203)] {
            let ours = region_rgb(&c, region).unwrap();
            let (x, y, w, h) = region;
            let mut diff_max = 0u8;
            let mut sq = 0.0;
            for row in 0..h {
                for col in 0..w {
                    for ch in 0..3 {
                        let a = ours[(row * w + col) * 3 + ch];
                        let b = whole.pixels[((y + row) * 1280 + x + col) * 3 + ch];
                        diff_max = diff_max.max(a.abs_diff(b));
                        sq += (a as f64 - b as f64).powi(2);
                    }
                }
            }
            let psnr = 10.0 * (255.0f64 * 255.0 / (sq / (w * h * 3) as f64).max(1e-9)).log10();
            eprintln!("{region:?}: largest difference {diff_max}, {psnr:.1} dB");
            assert!(diff_max <= 2, "{region:?}: {diff_max}");
        }
    }

    #[test]
    fn the_p3_region_of_the_corpus_photo_matches_and_is_timed() {
        let Some(jpeg) = corpus("Elephants_3840x2160.jpg") else {
            return;
        };
        let region = (1770, 0, 300, 2160);
        let mut ours = Vec::new();
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let c = decode(&jpeg, 1 << 22).unwrap();
            let decoded = started.elapsed();
            ours = region_rgb(&c, region).unwrap();
            eprintln!(
                "entropy decode {decoded:?}, with the region {:?}",
                started.elapsed()
            );
        }
        let whole: turbojpeg::Image<Vec<u8>> =
            turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::RGB).unwrap();
        let mut diff_max = 0u8;
        for row in 0..2160 {
            for col in 0..300 {
                for ch in 0..3 {
                    let a = ours[(row * 300 + col) * 3 + ch];
                    let b = whole.pixels[(row * 3840 + 1770 + col) * 3 + ch];
                    diff_max = diff_max.max(a.abs_diff(b));
                }
            }
        }
        eprintln!("largest difference {diff_max}");
        assert!(diff_max <= 2);
    }

    #[test]
    fn a_scan_naming_a_component_five_times_is_refused() {
        let jpeg = crate::imaging::tests::fixture("wood-progressive-1280.jpg");
        let sos = jpeg.windows(2).position(|w| w == [0xff, 0xda]).unwrap();
        let length = u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]) as usize;
        let first = &jpeg[sos + 4..sos + 2 + length];
        // The first (DC) scan, its first component listed five times.
        let mut header = vec![0xff, 0xda, 0, 16, 5];
        for _ in 0..5 {
            header.extend_from_slice(&first[1..3]);
        }
        header.extend_from_slice(&first[first.len() - 3..]);
        let crafted = [&jpeg[..sos], &header[..], &jpeg[sos + 2 + length..]].concat();
        assert!(decode(&crafted, 1 << 20).is_none());
    }

    #[test]
    fn damaged_files_give_none_or_coefficients_without_panicking() {
        let jpeg = crate::imaging::tests::fixture("wood-progressive-1280.jpg");
        assert!(decode(&jpeg, 1 << 20).is_some());
        let step = jpeg.len() / 101;
        for at in (2..jpeg.len()).step_by(step) {
            let _ = decode(&jpeg[..at], 1 << 20);
            let mut flipped = jpeg.clone();
            flipped[at] ^= 0x5a;
            let _ = decode(&flipped, 1 << 20);
        }
    }
}
