//! From OpenPose heat maps and part affinity fields to people: controlnet_aux's `Body.__call__`
//! after the network, step for step.
//!
//! 1. Peaks: each part's heat map is smoothed (Gaussian, σ = 3, reflected borders, as
//!    `scipy.ndimage.gaussian_filter`); a peak is a pixel ≥ its four neighbours and > 0.1, scored by
//!    the unsmoothed map. Peaks get ids in part order, row-major within a part.
//! 2. Limbs: every pair of peaks of a limb's two parts is scored by the PAF sampled at 10 points
//!    along the segment (dot product with its direction), plus a distance prior; pairs with > 80% of
//!    samples above 0.05 and a positive score are kept, greedily by score, each peak used once.
//! 3. People: limbs are joined into `subset` rows (18 candidate indices, total score, part count),
//!    merging rows that share no part; rows with < 4 parts or a mean score < 0.4 are dropped.

use super::draw::LIMBS as DRAWN_LIMBS;
use super::{Body, Keypoint};
use crate::preprocess::PreprocessError;

/// Heat-map threshold of a peak.
const PEAK_THRESHOLD: f64 = 0.1;
/// PAF threshold of a sample along a limb.
const PAF_THRESHOLD: f64 = 0.05;
/// Samples along a limb.
const SAMPLES: usize = 10;

/// The 19 limbs scored, as 0-based OpenPose part pairs: the 17 drawn, then the two ear–shoulder links.
const LIMBS: [(usize, usize); 19] = {
    let mut limbs = [(0, 0); 19];
    let mut i = 0;
    while i < DRAWN_LIMBS.len() {
        limbs[i] = DRAWN_LIMBS[i];
        i += 1;
    }
    limbs[17] = (2, 16);
    limbs[18] = (5, 17);
    limbs
};

/// PAF channels (x, y) of each limb.
const LIMB_PAF: [(usize, usize); 19] = [
    (12, 13),
    (20, 21),
    (14, 15),
    (16, 17),
    (22, 23),
    (24, 25),
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (8, 9),
    (10, 11),
    (28, 29),
    (30, 31),
    (34, 35),
    (32, 33),
    (36, 37),
    (18, 19),
    (26, 27),
];

/// Network outputs at image resolution, interleaved as numpy `[H, W, C]` arrays.
#[derive(Debug, Clone, Copy)]
pub struct PoseMaps<'a> {
    /// Map width.
    pub width: usize,
    /// Map height.
    pub height: usize,
    /// `[H, W, 19]` heat maps (18 parts and background).
    pub heatmaps: &'a [f64],
    /// `[H, W, 38]` part affinity fields.
    pub pafs: &'a [f64],
}

/// controlnet_aux's `candidate` and `subset` tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// One row per peak: x, y, score, id.
    pub candidates: Vec<[f64; 4]>,
    /// One row per person: candidate index of each of the 18 parts (−1 if missing), total score,
    /// number of parts.
    pub subset: Vec<[f64; 20]>,
}

impl Decoded {
    /// The people as OpenPose-18 bodies normalised to a `width × height` image.
    pub fn bodies(&self, width: usize, height: usize) -> Vec<Body> {
        self.subset
            .iter()
            .map(|row| {
                std::array::from_fn(|part| {
                    let index = row[part];
                    (index >= 0.0).then(|| {
                        let c = self.candidates[index as usize];
                        Keypoint { x: c[0] / width as f64, y: c[1] / height as f64, score: c[2] }
                    })
                })
            })
            .collect()
    }
}

/// The Gaussian kernel of `scipy.ndimage.gaussian_filter(sigma=3)` (radius 12), from the centre out.
fn gaussian_half_kernel() -> [f64; 13] {
    const RADIUS: i64 = 12;
    let phi: Vec<f64> = (-RADIUS..=RADIUS).map(|x| (-0.5 / 9.0 * (x * x) as f64).exp()).collect();
    // numpy's pairwise sum of 25 values: eight interleaved partial sums, then the remainder.
    let mut partial = [0f64; 8];
    for (i, v) in phi[..24].iter().enumerate() {
        partial[i % 8] += v;
    }
    let mut sum = ((partial[0] + partial[1]) + (partial[2] + partial[3]))
        + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
    sum += phi[24];
    std::array::from_fn(|j| phi[RADIUS as usize + j] / sum)
}

/// One axis of the Gaussian filter, with scipy's symmetric-kernel summation order and `reflect`
/// borders.
fn smooth_line(line: &[f64], kernel: &[f64; 13], out: &mut [f64]) {
    let n = line.len() as isize;
    let at = |i: isize| {
        let mut i = i;
        while i < 0 || i >= n {
            i = if i < 0 { -i - 1 } else { 2 * n - i - 1 };
        }
        line[i as usize]
    };
    for (i, o) in out.iter_mut().enumerate() {
        let i = i as isize;
        let mut acc = line[i as usize] * kernel[0];
        for j in (1..13).rev() {
            acc += (at(i - j as isize) + at(i + j as isize)) * kernel[j];
        }
        *o = acc;
    }
}

/// `gaussian_filter(map, sigma=3)` of an `h × w` map: along rows' axis 0 first, then axis 1.
fn gaussian_filter(map: &[f64], w: usize, h: usize) -> Vec<f64> {
    let kernel = gaussian_half_kernel();
    let mut vertical = vec![0f64; w * h];
    let (mut column, mut smoothed) = (vec![0f64; h], vec![0f64; h]);
    for x in 0..w {
        for y in 0..h {
            column[y] = map[y * w + x];
        }
        smooth_line(&column, &kernel, &mut smoothed);
        for y in 0..h {
            vertical[y * w + x] = smoothed[y];
        }
    }
    let mut out = vec![0f64; w * h];
    for y in 0..h {
        smooth_line(&vertical[y * w..(y + 1) * w], &kernel, &mut out[y * w..(y + 1) * w]);
    }
    out
}

/// Peaks of every part: (x, y, score, id).
fn find_peaks(maps: &PoseMaps) -> Vec<Vec<[f64; 4]>> {
    let (w, h) = (maps.width, maps.height);
    let mut next_id = 0usize;
    (0..18)
        .map(|part| {
            let original: Vec<f64> = (0..w * h).map(|i| maps.heatmaps[i * 19 + part]).collect();
            let smooth = gaussian_filter(&original, w, h);
            let at = |x: isize, y: isize| {
                if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
                    0.0
                } else {
                    smooth[y as usize * w + x as usize]
                }
            };
            let mut peaks = Vec::new();
            for y in 0..h as isize {
                for x in 0..w as isize {
                    let v = at(x, y);
                    if v > PEAK_THRESHOLD
                        && v >= at(x - 1, y)
                        && v >= at(x + 1, y)
                        && v >= at(x, y - 1)
                        && v >= at(x, y + 1)
                    {
                        let score = original[y as usize * w + x as usize];
                        peaks.push([x as f64, y as f64, score, next_id as f64]);
                        next_id += 1;
                    }
                }
            }
            peaks
        })
        .collect()
}

/// `np.linspace(start, stop, SAMPLES)`.
fn linspace(start: f64, stop: f64) -> [f64; SAMPLES] {
    let step = (stop - start) / (SAMPLES - 1) as f64;
    let mut values: [f64; SAMPLES] = std::array::from_fn(|i| i as f64 * step + start);
    values[SAMPLES - 1] = stop;
    values
}

/// A kept limb: the candidate ids of both ends and its score.
struct Connection {
    id_a: f64,
    id_b: f64,
    score: f64,
}

/// Scores every pair of peaks of limb `k`, keeping the best non-conflicting ones.
fn connect(maps: &PoseMaps, k: usize, cand_a: &[[f64; 4]], cand_b: &[[f64; 4]]) -> Vec<Connection> {
    let (paf_x, paf_y) = LIMB_PAF[k];
    let paf = |x: f64, y: f64, c: usize| {
        let (xi, yi) = (x.round_ties_even() as usize, y.round_ties_even() as usize);
        maps.pafs[(yi * maps.width + xi) * 38 + c]
    };
    let mut candidates = Vec::new();
    for (i, a) in cand_a.iter().enumerate() {
        for (j, b) in cand_b.iter().enumerate() {
            let (vx, vy) = (b[0] - a[0], b[1] - a[1]);
            let norm = (vx * vx + vy * vy).sqrt().max(0.001);
            let (vx, vy) = (vx / norm, vy / norm);
            let (xs, ys) = (linspace(a[0], b[0]), linspace(a[1], b[1]));
            let scores: Vec<f64> =
                (0..SAMPLES).map(|s| paf(xs[s], ys[s], paf_x) * vx + paf(xs[s], ys[s], paf_y) * vy).collect();
            let mean = scores.iter().fold(0.0, |acc, s| acc + s) / SAMPLES as f64;
            let score = mean + (0.5 * maps.height as f64 / norm - 1.0).min(0.0);
            let above = scores.iter().filter(|&&s| s > PAF_THRESHOLD).count();
            if above as f64 > 0.8 * SAMPLES as f64 && score > 0.0 {
                candidates.push((i, j, score));
            }
        }
    }
    // Stable sort, best first, as Python's sorted(reverse=True).
    candidates.sort_by(|x, y| y.2.total_cmp(&x.2));
    let mut kept: Vec<(usize, usize)> = Vec::new();
    let mut connections = Vec::new();
    for (i, j, score) in candidates {
        if kept.iter().all(|&(ki, kj)| ki != i && kj != j) {
            kept.push((i, j));
            connections.push(Connection { id_a: cand_a[i][3], id_b: cand_b[j][3], score });
            if connections.len() >= cand_a.len().min(cand_b.len()) {
                break;
            }
        }
    }
    connections
}

/// Decodes the network's maps into controlnet_aux's candidate and subset tables.
///
/// Maps whose lengths disagree with `width × height × channels` give
/// [`PreprocessError::InvalidParameter`].
pub fn decode(maps: &PoseMaps) -> Result<Decoded, PreprocessError> {
    let pixels = maps.width * maps.height;
    for (name, len, channels) in [("heatmaps", maps.heatmaps.len(), 19), ("pafs", maps.pafs.len(), 38)] {
        if len != pixels * channels {
            return Err(PreprocessError::InvalidParameter {
                name,
                reason: format!("{len} values for a {}x{}x{channels} map", maps.height, maps.width),
            });
        }
    }
    let peaks = find_peaks(maps);
    let candidates: Vec<[f64; 4]> = peaks.iter().flatten().copied().collect();
    let mut subset: Vec<[f64; 20]> = Vec::new();
    for (k, &(part_a, part_b)) in LIMBS.iter().enumerate() {
        let (cand_a, cand_b) = (&peaks[part_a], &peaks[part_b]);
        if cand_a.is_empty() || cand_b.is_empty() {
            continue;
        }
        for c in connect(maps, k, cand_a, cand_b) {
            let matches: Vec<usize> =
                (0..subset.len()).filter(|&j| subset[j][part_a] == c.id_a || subset[j][part_b] == c.id_b).collect();
            let gain = candidates[c.id_b as usize][2] + c.score;
            match matches[..] {
                [j] => {
                    if subset[j][part_b] != c.id_b {
                        subset[j][part_b] = c.id_b;
                        subset[j][19] += 1.0;
                        subset[j][18] += gain;
                    }
                }
                [j1, j2, ..] => {
                    let shared = (0..18).any(|p| subset[j1][p] >= 0.0 && subset[j2][p] >= 0.0);
                    if shared {
                        subset[j1][part_b] = c.id_b;
                        subset[j1][19] += 1.0;
                        subset[j1][18] += gain;
                    } else {
                        let other = subset[j2];
                        for p in 0..18 {
                            subset[j1][p] += other[p] + 1.0;
                        }
                        subset[j1][18] += other[18];
                        subset[j1][19] += other[19];
                        subset[j1][18] += c.score;
                        subset.remove(j2);
                    }
                }
                [] if k < 17 => {
                    let mut row = [-1.0; 20];
                    row[part_a] = c.id_a;
                    row[part_b] = c.id_b;
                    row[19] = 2.0;
                    row[18] = candidates[c.id_a as usize][2] + candidates[c.id_b as usize][2] + c.score;
                    subset.push(row);
                }
                [] => {}
            }
        }
    }
    subset.retain(|row| !(row[19] < 4.0 || row[18] / row[19] < 0.4));
    Ok(Decoded { candidates, subset })
}
