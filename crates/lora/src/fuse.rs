//! Fusing several LoRAs (EasyPhoto: the checkpoints whose validation faces scored best) into one.
//!
//! | | [`average_elementwise`] (EasyPhoto) | [`average_deltas`] |
//! |---|---|---|
//! | what is averaged | each tensor: `down`, `up`, `alpha` separately | the weight deltas `alpha/rank · up·down` |
//! | result | `mean(up) · mean(down)`: not the mean of the deltas (cross terms) | the mean delta, best rank-`k` approximation (SVD) |
//! | rank | unchanged | chosen |
//! | use | reproducing EasyPhoto's `user_weights/{id}.safetensors` bit for bit | a fusion that means what it says |
//!
//! Both take the list as given: a checkpoint listed twice (two of the top validation images came
//! from the same step) counts twice. A module missing from some LoRAs contributes zero there
//! (the sum is still divided by the number of LoRAs), as in EasyPhoto's merge.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;

use crate::merge::pair_layout;
use crate::{KohyaLora, KohyaModule, LoraError, lora_scale};

/// EasyPhoto's `merge_from_name_and_index`: every tensor of every module averaged element-wise
/// (`down`, `up` and `alpha` separately, a missing alpha counting as the rank), in f32.
pub fn average_elementwise(loras: &[&KohyaLora]) -> Result<KohyaLora, LoraError> {
    // Accumulated as kohya's merge script (which EasyPhoto calls) does: `merged += tensor · ratio`
    // in list order, ratio = 1/n, in f32.
    let ratio = 1.0 / check_count(loras)? as f64;
    let mut sums: BTreeMap<String, KohyaModule> = BTreeMap::new();
    for lora in loras {
        for (name, m) in lora.modules() {
            let down = m.down.to_dtype(DType::F32)?.affine(ratio, 0.0)?;
            let up = m.up.to_dtype(DType::F32)?.affine(ratio, 0.0)?;
            let alpha = m.alpha.filter(|&a| a != 0.0).unwrap_or(m.rank() as f32) * ratio as f32;
            match sums.get_mut(name) {
                None => {
                    sums.insert(name.to_string(), KohyaModule { down, up, alpha: Some(alpha) });
                }
                Some(sum) => {
                    if sum.down.dims() != down.dims() || sum.up.dims() != up.dims() {
                        return Err(LoraError::Fuse {
                            reason: format!(
                                "module `{name}` of `{}` has shapes {:?} / {:?}, the others {:?} / {:?}",
                                lora.file(),
                                down.dims(),
                                up.dims(),
                                sum.down.dims(),
                                sum.up.dims()
                            ),
                        });
                    }
                    sum.down = (&sum.down + down)?;
                    sum.up = (&sum.up + up)?;
                    sum.alpha = sum.alpha.map(|a| a + alpha);
                }
            }
        }
    }
    Ok(KohyaLora::new("element-wise average", sums, loras[0].metadata().clone()))
}

/// The mean of the LoRAs' weight deltas `alpha/rank · up·down`, re-factorised to at most `rank`
/// by a truncated SVD in f64 (`up = U·√S`, `down = √S·Vᵀ`, `alpha = rank`, so scale 1).
pub fn average_deltas(loras: &[&KohyaLora], rank: usize) -> Result<KohyaLora, LoraError> {
    let n = check_count(loras)? as f64;
    if rank == 0 {
        return Err(LoraError::Fuse { reason: "the target rank must be at least 1".into() });
    }
    // Per module: out, the shape of down's trailing dims, and the summed delta [out, in·kh·kw].
    let mut sums: BTreeMap<String, (Vec<usize>, DMatrix<f64>)> = BTreeMap::new();
    for lora in loras {
        for (name, m) in lora.modules() {
            let delta = delta_matrix(m)?;
            let mut shape = vec![m.up.dim(0)?];
            shape.extend_from_slice(&m.down.dims()[1..]);
            match sums.get_mut(name) {
                None => {
                    sums.insert(name.to_string(), (shape, delta));
                }
                Some((s, sum)) if *s == shape => *sum += delta,
                Some((s, _)) => {
                    return Err(LoraError::Fuse {
                        reason: format!(
                            "module `{name}` of `{}` adapts a weight of shape {shape:?}, the others {s:?}",
                            lora.file()
                        ),
                    });
                }
            }
        }
    }
    let device = loras[0].modules().next().map_or(Device::Cpu, |(_, m)| m.down.device().clone());
    let modules = sums
        .into_iter()
        .map(|(name, (shape, sum))| Ok((name, factorise(&(sum / n), &shape, rank, &device)?)))
        .collect::<Result<_, LoraError>>()?;
    let mut metadata = loras[0].metadata().clone();
    metadata.insert("ss_network_dim".into(), rank.to_string());
    metadata.insert("ss_network_alpha".into(), rank.to_string());
    Ok(KohyaLora::new("delta average", modules, metadata))
}

fn check_count(loras: &[&KohyaLora]) -> Result<usize, LoraError> {
    match loras.len() {
        0 => Err(LoraError::Fuse { reason: "no LoRA given".into() }),
        n => Ok(n),
    }
}

/// `alpha/rank · up·down` as an f64 matrix `[out, in·kh·kw]`.
fn delta_matrix(m: &KohyaModule) -> Result<DMatrix<f64>, LoraError> {
    let (r, out) = pair_layout(m.down.dims(), m.up.dims())
        .ok_or_else(|| LoraError::Layout { down: m.down.dims().to_vec(), up: m.up.dims().to_vec() })?;
    let to_matrix = |t: &Tensor, rows: usize| -> Result<DMatrix<f64>, LoraError> {
        let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Ok(DMatrix::from_row_slice(rows, v.len() / rows.max(1), &v))
    };
    let (up, down) = (to_matrix(&m.up, out)?, to_matrix(&m.down, r)?);
    Ok(up * down * lora_scale(m.alpha, r))
}

/// The best rank-`rank` factorisation `up·down` of `delta`, as a kohya module of weight shape `shape`.
fn factorise(delta: &DMatrix<f64>, shape: &[usize], rank: usize, device: &Device) -> Result<KohyaModule, LoraError> {
    let (out, inner) = delta.shape();
    let svd = delta.clone().svd(true, true);
    let (u, vt) = match (svd.u, svd.v_t) {
        (Some(u), Some(vt)) => (u, vt),
        _ => return Err(LoraError::Fuse { reason: "SVD did not converge".into() }),
    };
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
    let k = rank.min(order.len());
    let mut up = vec![0f32; out * k];
    let mut down = vec![0f32; k * inner];
    for (j, &i) in order.iter().take(k).enumerate() {
        let s = svd.singular_values[i].sqrt();
        for o in 0..out {
            up[o * k + j] = (u[(o, i)] * s) as f32;
        }
        for c in 0..inner {
            down[j * inner + c] = (vt[(i, c)] * s) as f32;
        }
    }
    let mut down_shape = vec![k];
    down_shape.extend_from_slice(&shape[1..]);
    let up_shape: Vec<usize> = if shape.len() == 4 { vec![out, k, 1, 1] } else { vec![out, k] };
    Ok(KohyaModule {
        down: Tensor::from_vec(down, down_shape, device)?,
        up: Tensor::from_vec(up, up_shape, device)?,
        alpha: Some(k as f32),
    })
}
