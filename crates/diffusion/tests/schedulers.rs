//! The schedulers against diffusers 0.42.1: timesteps, sigmas, `init_noise_sigma`, the model
//! input scaling and full rollouts fed with fixed model outputs and fixed noise, `add_noise`,
//! `get_velocity`, the img2img start index, the A1111 sampler names and config errors. Fixtures
//! from `tools/reference/schedulers.py`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor};
use easyphoto_diffusion::DiffusionError;
use easyphoto_diffusion::schedulers::{
    DdimScheduler, DdpmScheduler, DpmSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    NoiseSource, Sampler, Scheduler, SchedulerConfig, UniPcMultistepScheduler, img2img_start_index,
};
use serde_json::Value;

/// Max abs error on samples, relative to `max(1, max |reference|)`.
const TOL: f32 = 1e-5;

struct Fixture {
    meta: Value,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers");
        let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).unwrap();
        Fixture { meta, tensors }
    })
}

fn tensor(key: &str) -> &'static Tensor {
    fixture().tensors.get(key).unwrap_or_else(|| panic!("no fixture tensor {key}"))
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// Max abs difference, and the reference's max abs value.
fn max_err(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
    assert_eq!(ours.dims(), reference.dims());
    assert_eq!(ours.dtype(), DType::F32);
    let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    (max((ours - reference).unwrap()), max(reference.clone()))
}

/// Asserts `ours` within `TOL * max(1, max |reference|)` of `reference`; returns the max abs
/// error.
fn check(what: &str, ours: &Tensor, reference: &Tensor) -> f32 {
    let (err, scale) = max_err(ours, reference);
    assert!(
        err <= TOL * scale.max(1.0),
        "{what}: max abs error {err:e} (reference max |x| {scale}) > {TOL:e} relative"
    );
    err
}

/// The fixture's noise tensors, in order.
struct FixedNoise {
    draws: usize,
}

impl NoiseSource for FixedNoise {
    fn noise_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        let z = tensor("inputs/noises").i(self.draws)?;
        self.draws += 1;
        z.to_dtype(like.dtype())
    }
}

fn config(value: &Value) -> SchedulerConfig {
    SchedulerConfig::from_value(value).unwrap()
}

/// The sigmas of a run, from the concrete scheduler.
fn sigmas(config: &SchedulerConfig, steps: usize) -> Option<Vec<f32>> {
    macro_rules! run {
        ($ty:ty, $c:expr) => {{
            let mut s = <$ty>::new($c.clone()).unwrap();
            s.set_timesteps(steps).unwrap();
            Some(s.sigmas().to_vec())
        }};
    }
    match config {
        SchedulerConfig::EulerDiscrete(c) => run!(EulerDiscreteScheduler, c),
        SchedulerConfig::EulerAncestralDiscrete(c) => run!(EulerAncestralDiscreteScheduler, c),
        SchedulerConfig::DpmSolverMultistep(c) => run!(DpmSolverMultistepScheduler, c),
        SchedulerConfig::UniPcMultistep(c) => run!(UniPcMultistepScheduler, c),
        _ => None,
    }
}

/// The config as diffusers would save it: every Rust field must be in diffusers' resolved
/// config, with the same value.
fn check_resolved(what: &str, config: &SchedulerConfig, resolved: &Value) {
    let ours = match config {
        SchedulerConfig::Ddim(c) => serde_json::to_value(c),
        SchedulerConfig::Ddpm(c) => serde_json::to_value(c),
        SchedulerConfig::EulerDiscrete(c) => serde_json::to_value(c),
        SchedulerConfig::EulerAncestralDiscrete(c) => serde_json::to_value(c),
        SchedulerConfig::DpmSolverMultistep(c) => serde_json::to_value(c),
        SchedulerConfig::UniPcMultistep(c) => serde_json::to_value(c),
        SchedulerConfig::Lcm(c) => serde_json::to_value(c),
    }
    .unwrap();
    for (key, value) in ours.as_object().unwrap() {
        let theirs = resolved.get(key).unwrap_or_else(|| panic!("{what}: diffusers has no config field `{key}`"));
        let same = match (value.as_f64(), theirs.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => value == theirs,
        };
        assert!(same, "{what}: `{key}` is {value}, diffusers {theirs}");
    }
}

/// Timesteps: exact, except those diffusers derives from `np.log` of float32 sigmas (Karras
/// sigmas mapped back to timesteps, and continuous timesteps), whose float32 log is not
/// correctly rounded in numpy.
fn check_timesteps(what: &str, ours: &[f64], reference: &[f64], tol: f64) -> f64 {
    assert_eq!(ours.len(), reference.len(), "{what}: timestep count");
    let err = ours.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(err <= tol, "{what}: timesteps {ours:?} vs diffusers {reference:?}");
    err
}

fn check_sigmas(what: &str, ours: &[f32], reference: &Tensor) -> f64 {
    let reference = f64s(reference);
    assert_eq!(ours.len(), reference.len(), "{what}: sigma count");
    let rel = ours.iter().zip(&reference).map(|(&a, &b)| (a as f64 - b).abs() / b.abs().max(1e-3)).fold(0.0, f64::max);
    assert!(rel <= 1e-6, "{what}: sigmas {ours:?} vs diffusers {reference:?}");
    rel
}

fn timestep_tol(config: &SchedulerConfig) -> f64 {
    match config {
        SchedulerConfig::EulerDiscrete(c) if c.use_karras_sigmas => 2e-4,
        _ => 0.0,
    }
}

/// The fixture case's scheduler (DDIM with its `eta`).
fn scheduler(case: &Value, cfg: &SchedulerConfig) -> Box<dyn Scheduler> {
    match (cfg, case.get("eta")) {
        (SchedulerConfig::Ddim(c), Some(eta)) => {
            let mut s = DdimScheduler::new(c.clone()).unwrap();
            s.set_eta(eta.as_f64().unwrap());
            Box::new(s)
        }
        _ => cfg.build().unwrap(),
    }
}

/// Max abs errors of one rollout of `case`: (samples, scaled model inputs, max |sample|).
/// `teacher_forced` starts every step from diffusers' previous sample, so each step's own error
/// shows; otherwise the run is free and errors accumulate as they would in a pipeline.
fn rollout(case: &Value, teacher_forced: bool) -> (f32, f32, f32) {
    let name = case["name"].as_str().unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let cfg = config(&case["config"]);
    let mut scheduler = scheduler(case, &cfg);
    scheduler.set_timesteps(steps).unwrap();
    let timesteps = scheduler.timesteps().to_vec();
    let start = match case.get("strength") {
        Some(strength) => {
            let start = img2img_start_index(steps, strength.as_f64().unwrap(), scheduler.order());
            assert_eq!(start as u64, case["start"].as_u64().unwrap(), "{name}: img2img start");
            scheduler.set_begin_index(start);
            start
        }
        None => 0,
    };
    let mut x = match case.get("strength") {
        Some(_) => scheduler.add_noise(tensor("inputs/x0"), tensor("inputs/noise0"), timesteps[start]).unwrap(),
        None => tensor("inputs/x_T").affine(scheduler.init_noise_sigma(), 0.0).unwrap(),
    };
    if let Some(begin) = case.get("begin_index") {
        scheduler.set_begin_index(begin.as_u64().unwrap() as usize);
    }

    let samples = tensor(&format!("{name}/samples"));
    let scaled = fixture().tensors.get(&format!("{name}/scaled"));
    let mut noise = FixedNoise { draws: 0 };
    let (mut worst, mut worst_scaled, mut magnitude) = (0f32, 0f32, 0f32);
    for (i, &t) in timesteps[start..].iter().enumerate() {
        let input = scheduler.scale_model_input(&x, t).unwrap();
        match scaled {
            Some(s) => worst_scaled = worst_scaled.max(check(&format!("{name} scaled {i}"), &input, &s.i(i).unwrap())),
            None => assert_eq!(max_err(&input, &x).0, 0.0, "{name}: scale_model_input is the identity"),
        }
        let mo = tensor("inputs/model_outputs").i(i).unwrap();
        x = scheduler.step(&mo, t, &x, &mut noise).unwrap();
        let reference = samples.i(i).unwrap();
        worst = worst.max(check(&format!("{name} step {i} (t = {t})"), &x, &reference));
        magnitude = magnitude.max(max_err(&reference, &reference.zeros_like().unwrap()).0);
        if teacher_forced {
            x = reference;
        }
    }
    assert_eq!(noise.draws as u64, case["noise_draws"].as_u64().unwrap(), "{name}: noise draws");
    (worst, worst_scaled, magnitude)
}

#[test]
fn rollouts_match_diffusers() {
    let mut report = vec![];
    for case in fixture().meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let cfg = config(&case["config"]);
        check_resolved(name, &cfg, &case["resolved_config"]);

        let mut scheduler = scheduler(case, &cfg);
        scheduler.set_timesteps(steps).unwrap();
        let reference = f64s(tensor(&format!("{name}/timesteps")));
        let t_err = check_timesteps(name, scheduler.timesteps(), &reference, timestep_tol(&cfg));
        let s_err = match sigmas(&cfg, steps) {
            Some(s) => check_sigmas(name, &s, tensor(&format!("{name}/sigmas"))),
            None => 0.0,
        };
        let init = scheduler.init_noise_sigma();
        let init_ref = f64s(tensor(&format!("{name}/init_noise_sigma")))[0];
        assert!((init - init_ref).abs() <= 1e-6 * init_ref, "{name}: init_noise_sigma {init} vs {init_ref}");

        let (free, scaled, magnitude) = rollout(case, false);
        let (forced, _, _) = rollout(case, true);
        assert!(forced <= TOL, "{name}: a single step is {forced:e} off diffusers");
        report.push(format!(
            "{name:34} {free:7.1e} {forced:7.1e} {magnitude:7.1} {scaled:7.1e} {t_err:7.1e} {s_err:7.1e}"
        ));
    }
    println!("max abs errors: free rollout, one step from diffusers' sample, max |sample|, scaled input,");
    println!("timesteps, sigmas (relative)\n{}", report.join("\n"));
}

#[test]
fn alphas_cumprod_match() {
    for case in fixture().meta["alphas_cumprod"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let SchedulerConfig::Ddpm(c) = config(&case["config"]) else { panic!("{name}: not DDPM") };
        let ours = DdpmScheduler::new(c).unwrap().alphas_cumprod().to_vec();
        let theirs: Vec<f32> = tensor(&format!("alphas_cumprod/{name}")).to_vec1().unwrap();
        if name.ends_with("zsnr") {
            // The rescaling takes a float32 torch.sqrt of the whole table, which MKL computes to
            // within an ulp but not always correctly rounded.
            let rel = ours.iter().zip(&theirs).map(|(a, b)| ((a - b) / b.max(1e-30)).abs()).fold(0.0, f32::max);
            assert!(rel < 1e-6, "{name}: relative error {rel}");
        } else {
            assert_eq!(ours, theirs, "{name}");
        }
    }
}

#[test]
fn add_noise_and_velocity() {
    let (original, noise) = (tensor("inputs/batch_original"), tensor("inputs/batch_noise"));
    for case in fixture().meta["add_noise"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg = config(&case["config"]);
        let reference = tensor(&format!("add_noise/{name}"));
        match &cfg {
            SchedulerConfig::Ddpm(c) => {
                let ddpm = DdpmScheduler::new(c.clone()).unwrap();
                let t: Vec<usize> =
                    case["timesteps"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as usize).collect();
                check("ddpm add_noise", &ddpm.add_noise_at(original, noise, &t).unwrap(), reference);
                check(
                    "ddpm get_velocity",
                    &ddpm.get_velocity(original, noise, &t).unwrap(),
                    tensor("get_velocity/ddpm"),
                );
                // The trait's single timestep equals a per-item list of the same value.
                let one = ddpm.add_noise(original, noise, t[1] as f64).unwrap();
                check("ddpm add_noise single", &one, &ddpm.add_noise_at(original, noise, &[t[1], t[1]]).unwrap());
            }
            SchedulerConfig::Ddim(_) => {
                let t = case["timesteps"][0].as_f64().unwrap();
                check("ddim add_noise", &cfg.build().unwrap().add_noise(original, noise, t).unwrap(), reference);
            }
            SchedulerConfig::EulerDiscrete(_) => {
                let mut euler = cfg.build().unwrap();
                euler.set_timesteps(case["steps"].as_u64().unwrap() as usize).unwrap();
                let t = euler.timesteps()[case["timestep_index"].as_u64().unwrap() as usize];
                check("euler add_noise", &euler.add_noise(original, noise, t).unwrap(), reference);
            }
            _ => panic!("{name}: unexpected"),
        }
    }
}

#[test]
fn img2img_start_index_matches_the_pipeline() {
    for case in fixture().meta["img2img"].as_array().unwrap() {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let strength = case["strength"].as_f64().unwrap();
        let order = case["order"].as_u64().unwrap() as usize;
        let start = img2img_start_index(steps, strength, order);
        assert_eq!(start as u64, case["start"].as_u64().unwrap(), "{steps} steps, strength {strength}");
    }
    assert_eq!(img2img_start_index(10, f64::NAN, 1), 10);
    assert_eq!(img2img_start_index(10, -0.5, 1), 10);
    assert_eq!(img2img_start_index(10, 1.5, 1), 0);
    assert_eq!(img2img_start_index(10, 0.5, 2), 10);
}

#[test]
fn sampler_names_match_diffusers_from_config() {
    let base = &fixture().meta["sd15_scheduler_config"];
    for case in fixture().meta["samplers"].as_array().unwrap() {
        let name = case["sampler"].as_str().unwrap();
        let sampler: Sampler = name.parse().unwrap();
        assert_eq!(sampler.to_string(), name);
        let cfg = sampler.config(base).unwrap();
        assert_eq!(cfg.class_name(), case["class_name"].as_str().unwrap(), "{name}");
        check_resolved(name, &cfg, &case["resolved_config"]);
        let steps = case["steps"].as_u64().unwrap() as usize;
        let mut scheduler = cfg.build().unwrap();
        scheduler.set_timesteps(steps).unwrap();
        let key = format!("sampler/{name}");
        check_timesteps(name, scheduler.timesteps(), &f64s(tensor(&format!("{key}/timesteps"))), 0.0);
        if let Some(s) = sigmas(&cfg, steps) {
            check_sigmas(name, &s, tensor(&format!("{key}/sigmas")));
        }
        let init_ref = f64s(tensor(&format!("{key}/init_noise_sigma")))[0];
        assert!((scheduler.init_noise_sigma() - init_ref).abs() <= 1e-6 * init_ref, "{name}: init_noise_sigma");
    }
    let err = "DPM++ 3M SDE".parse::<Sampler>().unwrap_err();
    assert!(matches!(err, DiffusionError::InvalidInput { name: "sampler", .. }), "{err}");
}

/// The field a config error names.
fn error_field(json: &str) -> String {
    match SchedulerConfig::from_json(json).and_then(|c| c.build().map(|_| ())) {
        Err(DiffusionError::Config { field, .. }) => field,
        other => panic!("{json}: expected a config error, got {other:?}"),
    }
}

#[test]
fn unsupported_config_values_name_the_field() {
    for (json, field) in [
        (r#"{"_class_name": "DDIMScheduler", "thresholding": true}"#, "thresholding"),
        (r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": "many"}"#, "num_train_timesteps"),
        (r#"{"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]}"#, "trained_betas"),
        (r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "uniform"}"#, "timestep_spacing"),
        (r#"{"_class_name": "DDPMScheduler", "variance_type": "learned_range"}"#, "variance_type"),
        (r#"{"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}"#, "beta_schedule"),
        (r#"{"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": true}"#, "use_exponential_sigmas"),
        (r#"{"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}"#, "interpolation_type"),
        (r#"{"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"}"#, "prediction_type"),
        (r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}"#, "algorithm_type"),
        (r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}"#, "solver_order"),
        (r#"{"_class_name": "DPMSolverMultistepScheduler", "variance_type": "learned"}"#, "variance_type"),
        (r#"{"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": true}"#, "use_lu_lambdas"),
        (r#"{"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction"}"#, "prediction_type"),
        (r#"{"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": true}"#, "use_flow_sigmas"),
        (r#"{"_class_name": "LCMScheduler", "original_inference_steps": 2000}"#, "original_inference_steps"),
        (r#"{"_class_name": "PNDMScheduler"}"#, "_class_name"),
        (r#"{"beta_start": 0.1}"#, "_class_name"),
    ] {
        assert_eq!(error_field(json), field, "{json}");
    }
}

#[test]
fn diffusers_json_quirks_are_read() {
    // -Infinity (Python's json for an unset lambda_min_clipped), nulls, _use_default_values, and
    // the solver_type names diffusers maps to others.
    let cfg = SchedulerConfig::from_json(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "trained_betas": null, "use_karras_sigmas": null, "solver_type": "bh2",
            "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}"#,
    )
    .unwrap();
    let SchedulerConfig::DpmSolverMultistep(c) = cfg else { panic!() };
    assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
    assert!(!c.use_karras_sigmas);
    assert_eq!(c.solver_type, easyphoto_diffusion::schedulers::SolverType::Midpoint);
    assert_eq!(c.timestep_spacing, easyphoto_diffusion::schedulers::TimestepSpacing::Linspace);
}

#[test]
fn bad_calls_are_errors() {
    let mut euler = config(&serde_json::json!({"_class_name": "EulerDiscreteScheduler"})).build().unwrap();
    assert!(matches!(euler.set_timesteps(0), Err(DiffusionError::InvalidInput { name: "num_inference_steps", .. })));
    euler.set_timesteps(10).unwrap();
    let x = Tensor::zeros((1, 4, 8, 6), DType::F32, &Device::Cpu).unwrap();
    let mut noise = FixedNoise { draws: 0 };
    assert!(matches!(euler.step(&x, 3.5, &x, &mut noise), Err(DiffusionError::InvalidInput { name: "timestep", .. })));

    let mut ddim = config(&serde_json::json!({"_class_name": "DDIMScheduler"})).build().unwrap();
    assert!(matches!(ddim.step(&x, 999.0, &x, &mut noise), Err(DiffusionError::InvalidInput { .. })));
    ddim.set_timesteps(10).unwrap();
    assert!(matches!(
        ddim.step(&x, 1000.0, &x, &mut noise),
        Err(DiffusionError::InvalidInput { name: "timestep", .. })
    ));
    assert!(matches!(ddim.set_timesteps(1001), Err(DiffusionError::InvalidInput { .. })));

    // A run that steps past its end.
    let mut dpm = config(&serde_json::json!({"_class_name": "DPMSolverMultistepScheduler"})).build().unwrap();
    dpm.set_timesteps(2).unwrap();
    let t = dpm.timesteps().to_vec();
    for &t in &t {
        dpm.step(&x, t, &x, &mut noise).unwrap();
    }
    assert!(dpm.step(&x, t[1], &x, &mut noise).is_err());

    // A noise source of the wrong shape.
    let mut sde = config(&serde_json::json!({"_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "sde-dpmsolver++"}))
    .build()
    .unwrap();
    sde.set_timesteps(5).unwrap();
    let mut wrong = |_: &Tensor| Tensor::zeros(3, DType::F32, &Device::Cpu);
    let t = sde.timesteps()[0];
    assert!(matches!(sde.step(&x, t, &x, &mut wrong), Err(DiffusionError::InvalidInput { name: "noise", .. })));
}

#[test]
fn half_precision_runs_in_float32_and_returns_the_input_dtype() {
    let case =
        &fixture().meta["cases"].as_array().unwrap().iter().find(|c| c["name"] == "dpm_2m_sde_karras_10").unwrap();
    let cfg = config(&case["config"]);
    let (mut full, mut half) = (cfg.build().unwrap(), cfg.build().unwrap());
    full.set_timesteps(10).unwrap();
    half.set_timesteps(10).unwrap();
    let x = tensor("inputs/x_T");
    let (mut xf, mut xh) = (x.clone(), x.to_dtype(DType::F16).unwrap());
    let (mut nf, mut nh) = (FixedNoise { draws: 0 }, FixedNoise { draws: 0 });
    for (i, &t) in full.timesteps().to_vec().iter().enumerate() {
        let mo = tensor("inputs/model_outputs").i(i).unwrap();
        xf = full.step(&mo, t, &xf, &mut nf).unwrap();
        xh = half.step(&mo.to_dtype(DType::F16).unwrap(), t, &xh, &mut nh).unwrap();
        assert_eq!(xh.dtype(), DType::F16);
    }
    let (err, _) = max_err(&xh.to_dtype(DType::F32).unwrap(), &xf);
    // float16 rounding of the sample at every step, amplified by 1 / alpha_t at high sigma.
    assert!(err < 0.25, "float16 run differs by {err}");
}
