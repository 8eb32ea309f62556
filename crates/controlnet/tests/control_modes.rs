//! Control modes, guidance windows and unit sums on known residuals.

use candle_core::{Device, Tensor};
use easyphoto_controlnet::ControlMode;
use easyphoto_controlnet::control::{add_residuals, apply_mode};
use easyphoto_diffusion::sampling::Residuals;

/// 12 down residuals and a mid residual (SD 1.5's 13), residual `i` filled with `i + 1`, for a
/// batch of `rows`.
fn known(rows: usize) -> Residuals {
    let fill = |i: usize| Tensor::full((i + 1) as f32, (rows, 2, 3, 2), &Device::Cpu).unwrap();
    Residuals { down: (0..12).map(fill).collect(), mid: fill(12) }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Every element of row block `rows` of `t` equals `v` (to f32 rounding).
fn assert_rows(t: &Tensor, rows: std::ops::Range<usize>, v: f64, what: &str) {
    let part = t.narrow(0, rows.start, rows.len()).unwrap();
    for x in values(&part) {
        assert!((x as f64 - v).abs() <= 1e-6 * v.abs().max(1.0), "{what}: {x} != {v}");
    }
}

#[test]
fn prompt_more_important_scales_residual_i_by_0_825_pow_12_minus_i_on_both_branches() {
    let weight = 0.5;
    let out = apply_mode(&known(2), ControlMode::PromptMoreImportant, weight, true).unwrap();
    for (i, d) in out.down.iter().enumerate() {
        assert_eq!(d.dims(), &[2, 2, 3, 2]);
        let expected = (i + 1) as f64 * weight * 0.825f64.powi(12 - i as i32);
        assert_rows(d, 0..2, expected, &format!("down {i}"));
    }
    // The mid block is residual 12: factor 0.825^0 = 1.
    assert_rows(&out.mid, 0..2, 13.0 * weight, "mid");
    // Known values of the WebUI's factors.
    let s = ControlMode::PromptMoreImportant.scales(1.0, 13);
    assert!((s[0] - 0.099_413_962_063).abs() < 1e-11 && s[12] == 1.0 && (s[11] - 0.825).abs() < 1e-12);
}

#[test]
fn sdxl_soft_weights_take_the_first_ten_factors() {
    let s = ControlMode::PromptMoreImportant.scales(2.0, 10);
    assert_eq!(s.len(), 10);
    assert!((s[9] - 2.0 * 0.825f64.powi(3)).abs() < 1e-12, "mid of SDXL gets 0.825^3");
}

#[test]
fn balanced_scales_every_residual_by_the_weight() {
    let out = apply_mode(&known(2), ControlMode::Balanced, 0.85, true).unwrap();
    for (i, d) in out.down.iter().enumerate() {
        assert_rows(d, 0..2, (i + 1) as f64 * 0.85, "down");
    }
    assert_rows(&out.mid, 0..2, 13.0 * 0.85, "mid");
}

#[test]
fn controlnet_more_important_acts_on_the_conditional_branch_only() {
    // Residuals of the conditional rows (batch 1) are placed after zeros for the negative row.
    let out = apply_mode(&known(1), ControlMode::ControlNetMoreImportant, 1.0, true).unwrap();
    for (i, d) in out.down.iter().chain(std::iter::once(&out.mid)).enumerate() {
        assert_eq!(d.dims(), &[2, 2, 3, 2]);
        assert_rows(d, 0..1, 0.0, "unconditional row");
        assert_rows(d, 1..2, (i + 1) as f64 * 0.825f64.powi(12 - i as i32), "conditional row");
    }
    // Without guidance there is only the conditional branch.
    let out = apply_mode(&known(1), ControlMode::ControlNetMoreImportant, 1.0, false).unwrap();
    assert_eq!(out.mid.dims(), &[1, 2, 3, 2]);
}

#[test]
fn guess_mode_is_torch_logspace_on_the_conditional_branch() {
    let out = apply_mode(&known(1), ControlMode::GuessMode, 0.6, true).unwrap();
    // torch.logspace(-1, 0, 13) in float32.
    for (i, d) in out.down.iter().chain(std::iter::once(&out.mid)).enumerate() {
        let expected = (i + 1) as f64 * 0.6 * 10f64.powf(-1.0 + i as f64 / 12.0);
        assert_rows(d, 0..1, 0.0, "unconditional row");
        let got = values(&d.narrow(0, 1, 1).unwrap())[0] as f64;
        assert!((got - expected).abs() < 1e-5 * expected, "guess residual {i}: {got} vs {expected}");
    }
}

#[test]
fn units_sum() {
    let a = apply_mode(&known(2), ControlMode::Balanced, 0.5, true).unwrap();
    let b = apply_mode(&known(2), ControlMode::PromptMoreImportant, 1.0, true).unwrap();
    let sum = add_residuals(&a, &b).unwrap();
    for (i, d) in sum.down.iter().enumerate() {
        let v = (i + 1) as f64 * (0.5 + 0.825f64.powi(12 - i as i32));
        assert_rows(d, 0..2, v, "sum");
    }
}

#[test]
fn guidance_window_follows_diffusers() {
    use std::sync::Arc;

    use easyphoto_controlnet::{ControlUnit, load_controlnet};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd15_controlnet");
    let model = Arc::new(load_controlnet(&dir, None, candle_core::DType::F32, &Device::Cpu).unwrap());
    let image = Tensor::zeros((1, 3, 32, 24), candle_core::DType::F32, &Device::Cpu).unwrap();
    let window = |start: f64, end: f64| -> Vec<bool> {
        let unit =
            ControlUnit { guidance_start: start, guidance_end: end, ..ControlUnit::new(model.clone(), image.clone()) };
        (0..10).map(|i| unit.is_active(i, 10)).collect()
    };
    // diffusers: keep = !(i / n < start || (i + 1) / n > end).
    assert_eq!(window(0.0, 1.0), vec![true; 10]);
    assert_eq!(window(0.2, 1.0), [vec![false; 2], vec![true; 8]].concat());
    assert_eq!(window(0.0, 0.5), [vec![true; 5], vec![false; 5]].concat());
    assert_eq!(window(0.25, 0.75), [vec![false; 3], vec![true; 4], vec![false; 3]].concat());
}
