//! What [`VerifiedMtcnn`]'s BlazeFace check adds to MTCNN, per photo and per proposal (medians).
//!
//! `cargo run -p easyphoto-face --example verify_cost -- PHOTO...` (1 ONNX Runtime thread; needs
//! ORT_DYLIB_PATH).

use std::time::Instant;

use easyphoto_face::{FaceDetector, Mtcnn, MtcnnConfig, VerifiedMtcnn, load_rgb, verified};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = MtcnnConfig { steps_threshold: verified::PROPOSAL_THRESHOLDS, ..MtcnnConfig::default() };
    let (mtcnn, cascade) = (Mtcnn::with_config(config, 1)?, VerifiedMtcnn::new(1)?);
    for path in std::env::args().skip(1) {
        let img = load_rgb(&path)?;
        let n = mtcnn.detect(&img)?.len();
        let (mut proposals, mut checked) = (Vec::new(), Vec::new());
        for _ in 0..11 {
            let t = Instant::now();
            mtcnn.detect(&img)?;
            proposals.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            cascade.proposals(&img)?;
            checked.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (a, b) = (median(proposals), median(checked));
        let per = if n > 0 { (b - a) / n as f64 } else { 0.0 };
        println!("{path}: MTCNN {a:.1} ms, with verification {b:.1} ms, {n} proposals, {per:.1} ms each");
    }
    Ok(())
}
