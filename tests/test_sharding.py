"""SPMD on a (data=2, fsdp=2) mesh of 4 CPU devices: a train step equals the single-device step,
and the Pallas attention, decode and CCA prologue kernels run per device on the batch rather than
replicated; on a (data=2, fsdp=1) mesh of 2, the kernels lower for the GPU free of what once
crashed XLA's compile of a 2-GPU train step."""

import subprocess
import sys

from tests.test_train import ROOT, SUBPROCESS_ENV


def run_on_cpu_devices(script: str, devices: int) -> None:
    """Runs ``script`` in a fresh process on ``devices`` CPU devices; it must print OK."""
    env = SUBPROCESS_ENV | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": SUBPROCESS_ENV["XLA_FLAGS"]
                            + f" --xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


SCRIPT = r"""
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from ccajax import models, sharding, training

assert jax.device_count() == 4, jax.devices()
att = models.attention_config("ccgqa", d_model=32, num_heads=4, head_dim=8, num_kv_heads=1)
cfg = models.LMConfig(vocab_size=64, num_layers=1, attention=att, mlp_dim=64, dtype="float32")
tx = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-2, warmup_steps=1,
                                                      total_steps=10))
tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
         "loss_mask": np.ones((8, 16), np.float32), "segment_ids": np.ones((8, 16), np.int32)}

def run(mesh):
    graphdef, _, shardings = training.abstract_train_state(cfg, tx, mesh)
    state = training.init_train_state(cfg, tx, 0, shardings)
    step, _ = training.jit_steps(graphdef, shardings, mesh)
    device_batch = sharding.shard_batch(batch, sharding.batch_sharding(mesh))
    losses = []
    for _ in range(3):
        state, metrics = step(state, device_batch)
        losses.append(float(metrics["loss"]))
    return state, losses

sharded, sharded_losses = run(sharding.make_mesh(data=2, fsdp=2))
single, single_losses = run(sharding.make_mesh(devices=jax.devices()[:1]))

embedding = sharded["model"]["embed"]["embedding"][...]
assert embedding.sharding.spec == P("fsdp", None), embedding.sharding.spec  # (64, 32): vocab split
assert len({s.device for s in embedding.addressable_shards}) == 4
assert embedding.addressable_shards[0].data.shape == (32, 32)
mu = sharded["optimizer"]["opt_state"][1][0]["mu"]["embed"]["embedding"][...]
assert mu.sharding.spec == P("fsdp", None) and mu.addressable_shards[0].data.shape == (32, 32)
scale = sharded["model"]["final_norm"]["scale"][...]
assert scale.sharding.is_fully_replicated
assert len(single["model"]["embed"]["embedding"][...].sharding.device_set) == 1

np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
assert sharded_losses[-1] < sharded_losses[0]
for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
print("OK", sharded_losses)
"""


def test_sharded_step_equals_single_device_step():
    run_on_cpu_devices(SCRIPT, 4)


KERNEL_SCRIPT = r"""
import warnings
import jax, jax.numpy as jnp, numpy as np
import ccajax.pallas.attention as pallas_attention
from ccajax import models, sharding, training
from ccajax.attention import dot_product_attention, reference_attention

# The kernels are replaced by the reference (the CPU interpreter of Mosaic GPU kernels cannot
# run on two CPU devices at once), inside their real custom VJPs; what is checked is the batch
# each call sees and the gradients. Like a Pallas kernel, a stand-in sees and returns arrays
# without shard_map's varying mesh axes (a callback drops them) and computes on the local rows
# only: the custom VJP must restore the types, else shard_map's transpose sums the cotangents
# over the devices or a parameter's gradient misses that sum (both seen on 2026-11-30).
def like_a_kernel(tree):
    return jax.tree.map(lambda a: a if a is None else jax.pure_callback(
        lambda x: x, jax.ShapeDtypeStruct(a.shape, a.dtype), a), tree)
seen = []
def attention_fwd_stand_in(q, k, v, *, is_causal, scale, segment_ids):
    seen.append(q.shape[0])
    q, k, v, segment_ids = like_a_kernel((q, k, v, segment_ids))
    out = reference_attention(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids)
    return out, jnp.zeros(q.shape[:3], jnp.float32)  # the backward stand-in needs no lse
def attention_bwd_stand_in(q, k, v, out, lse, d_out, *, is_causal, scale, segment_ids,
                           fused_dq):
    del fused_dq  # how the kernels sum dq; the stand-in has no kernels
    q, k, v, d_out, segment_ids = like_a_kernel((q, k, v, d_out, segment_ids))
    _, vjp = jax.vjp(lambda q, k, v: reference_attention(
        q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids), q, k, v)
    return vjp(d_out)
pallas_attention.attention_fwd = attention_fwd_stand_in
pallas_attention.attention_bwd = attention_bwd_stand_in

rng = np.random.default_rng(0)
q = jnp.asarray(rng.normal(size=(8, 16, 4, 64)), jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(8, 16, 2, 64)), jnp.float32) for _ in range(2))
seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 11], 8, 0), jnp.int32)
def loss(q, k, v, seg):
    out = dot_product_attention(q, k, v, is_causal=True, segment_ids=seg, implementation="mosaic")
    return (out * jnp.arange(64.0)).sum()
grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
want = grads(q, k, v, seg)
assert seen == [8], seen  # no mesh: the whole batch
mesh = sharding.make_mesh(data=2, fsdp=2)
seen.clear()
with jax.set_mesh(mesh):
    got = grads(q, k, v, seg)
assert seen == [2], seen  # 8 rows over 4 devices
for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)

seen.clear()
with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(loss)(q[:6], k[:6], v[:6], seg[:6])
assert seen == [6], seen
assert "batch 6 is not a multiple of the 4 devices" in str(caught[0].message), caught

# Training traces under its mesh: the kernel sees each device's rows.
att = models.attention_config("ccgqa", d_model=128, num_heads=4, head_dim=64, num_kv_heads=1)
cfg = models.LMConfig(vocab_size=64, num_layers=1, attention=att, mlp_dim=64, dtype="float32",
                      attention_implementation="mosaic")
tx = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-2, warmup_steps=1,
                                                      total_steps=10))
tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
         "loss_mask": np.ones((8, 16), np.float32), "segment_ids": np.ones((8, 16), np.int32)}
graphdef, _, shardings = training.abstract_train_state(cfg, tx, mesh)
state = training.init_train_state(cfg, tx, 0, shardings)
step, _ = training.jit_steps(graphdef, shardings, mesh)
seen.clear()
step(state, sharding.shard_batch(batch, sharding.batch_sharding(mesh)))
assert seen == [2], seen

# The decode kernel likewise.
import ccajax.pallas.decode_sm90 as decode_sm90
from ccajax.pallas.decode import decode_attention, decode_attention_reference
def decode_stand_in(q, k, v, lengths, *, scale, block_kv):
    seen.append(q.shape[0])
    return decode_attention_reference(q, k, v, lengths, scale=scale)
decode_sm90.decode_attention_sm90 = decode_stand_in
q1 = jnp.asarray(rng.normal(size=(8, 4, 64)), jnp.bfloat16)
cache = jnp.asarray(rng.normal(size=(8, 128, 2, 64)), jnp.bfloat16)
lengths = jnp.arange(8, dtype=jnp.int32) * 16 + 1
step1 = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, implementation="mosaic"))
seen.clear()
with jax.set_mesh(mesh):
    got = step1(q1, cache, cache, lengths)
assert seen == [2], seen
want = decode_attention_reference(q1, cache, cache, lengths)
np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))

# The CCA prologue kernel likewise; its conv parameters and key temperature go whole to every
# device, and their gradients are summed over the devices.
import ccajax.pallas.prologue_sm90 as prologue_sm90
from jax.sharding import PartitionSpec as P
from ccajax import CCAConfig, init_cca_params
from ccajax.cca_fused import fused_prologue
# The CCA prologue's kernels likewise (stand-ins as above).
def reference_prologue(p, conv, temp, positions, segment_positions, cfg):
    u = p[:, :, :cfg.num_q_heads + cfg.num_kv_heads].astype(jnp.float32)
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
    q, k = fused_prologue(f32(conv), f32(temp), u, cfg, positions, segment_positions)
    return q.astype(p.dtype), k.astype(p.dtype)
def prologue_fwd_stand_in(p, conv, temp, positions, segment_positions, cfg):
    seen.append(p.shape[0])
    return reference_prologue(*like_a_kernel((p, conv, temp, positions, segment_positions)), cfg)
def prologue_bwd_stand_in(p, conv, temp, positions, segment_positions, d_q, d_k, cfg):
    p, conv, temp, positions, segment_positions, d_q, d_k = like_a_kernel(
        (p, conv, temp, positions, segment_positions, d_q, d_k))
    _, vjp = jax.vjp(lambda *a: reference_prologue(*a, positions, segment_positions, cfg),
                     p, conv, temp)
    return vjp((d_q, d_k))
real_prologue_bwd = prologue_sm90.prologue_bwd
prologue_sm90.prologue_fwd = prologue_fwd_stand_in
prologue_sm90.prologue_bwd = prologue_bwd_stand_in
pcfg = CCAConfig(d_model=128, num_q_heads=2, num_kv_heads=1, head_dim=64)
params = init_cca_params(jax.random.key(0), pcfg, jnp.bfloat16)  # the kernel takes 16-bit inputs
p = jnp.asarray(rng.normal(size=(8, 16, 4, 64)), jnp.bfloat16)
pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (8, 16))
def prologue_loss(p, conv, temp):
    q, k = prologue_sm90.mosaic_prologue(p, conv, temp, pos, pos, pcfg)
    return (q * jnp.arange(64.0)).sum() + (k ** 2).sum()
grads = jax.jit(jax.value_and_grad(prologue_loss, (0, 1, 2)))
seen.clear()
want = grads(p, params["conv"], params["qk_norm"]["temp"])
with jax.set_mesh(mesh):
    got = grads(p, params["conv"], params["qk_norm"]["temp"])
assert seen == [8, 2], seen
for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # bf16 sums in another order
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2 * np.abs(w).max())

# Inside a user's own shard_map (no mesh in context, so no over_batch split): the conv and
# temperature gradients are still summed over the devices.
def local_loss(p, conv, temp):
    pos = jnp.broadcast_to(jnp.arange(p.shape[1], dtype=jnp.int32), p.shape[:2])
    q, k = prologue_sm90.mosaic_prologue(p, conv, temp, pos, pos, pcfg)
    loss = (q * jnp.arange(64.0)).sum() + (k ** 2).sum()
    return jax.lax.psum(loss, ("data", "fsdp"))
user_sharded = jax.shard_map(local_loss, mesh=mesh, in_specs=(P(("data", "fsdp")), P(), P()),
                             out_specs=P())
got = jax.jit(jax.value_and_grad(user_sharded, (0, 1, 2)))(p, params["conv"], params["qk_norm"]["temp"])
for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2 * np.abs(w).max())

# prologue_bwd's own XLA ops (dW1, the temperature's chain rule) on kernel-typed values: the three
# backward kernels stubbed by zeros of their output types; only the tracing is checked (the
# temperature's chain rule once failed on 2 H200s on kernel outputs).
def dy_stub(inputs, d_q, d_k, cfg):
    b, s, _, d = inputs[0].shape
    h = cfg.num_q_heads + cfg.num_kv_heads
    return like_a_kernel((jnp.zeros((h, b, s, d), inputs[0].dtype),
                          jnp.zeros((h, b, s), jnp.float32)))
def du_stub(dy, segpos_next, vecs, w1, cfg):
    h, b, s, d = dy.shape
    return like_a_kernel(jnp.zeros((b, s, h, d), dy.dtype))
def lag_stub(u, dy, segpos_next):
    h, _, _, d = dy.shape
    return like_a_kernel(jnp.zeros((3, h, d, d), jnp.float32))
prologue_sm90._dy_kernel, prologue_sm90._du_kernel = dy_stub, du_stub
prologue_sm90._lag_kernel = lag_stub
prologue_sm90.prologue_bwd = real_prologue_bwd
with jax.set_mesh(mesh):  # a new jit: the one above has its trace cached
    jax.jit(jax.grad(prologue_loss, (0, 1, 2)))(p, params["conv"], params["qk_norm"]["temp"])
print("OK")
"""


def test_pallas_kernels_run_per_device_under_a_mesh():
    run_on_cpu_devices(KERNEL_SCRIPT, 4)


PARTLY_SPLIT_SCRIPT = r"""
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from ccajax import CCAConfig, init_cca_params, sharding
from ccajax.pallas.attention import mosaic_attention
from ccajax.pallas.prologue_sm90 import mosaic_prologue

# The real kernels, lowered for the GPU on a (data=2, fsdp=1) mesh, as the 2-GPU `small` run
# has it: the batch is split over "data" only. The shard_map is manual over both axes (else every
# op of the kernels' wrappers gets a sharding constraint for "fsdp"), and with full RoPE the
# prologue's head vectors hold no scatter with an empty index constant: with one inside the
# shard_map, XLA's GPU compile of that train step crashed (2026-11-30, shardy-xla segfault).
cfg = CCAConfig(d_model=256, num_q_heads=2, num_kv_heads=1, head_dim=64, rope_fraction=1.0)
params = init_cca_params(jax.random.key(0), cfg, jnp.bfloat16)
mesh = sharding.make_mesh(data=2, fsdp=1)
p = jax.ShapeDtypeStruct((4, 128, 4, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
pos = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), (4, 128))
def loss(p, conv, temp):
    q, k = mosaic_prologue(p, conv, temp, pos, pos, cfg)
    return mosaic_attention(q, k, k, is_causal=True).astype(jnp.float32).sum()
def step(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.grad(loss, (0, 1, 2))(*args)
text = jax.jit(step).trace(p, params["conv"], params["qk_norm"]["temp"]).lower(
    lowering_platforms=("cuda",)).as_text()
assert text.count("sdy.manual_computation") >= 4, "the kernels did not run under shard_map"
assert "sdy.sharding_constraint" not in text, "sharding constraints inside the kernels' shard_map"
assert "tensor<0x" not in text, "an empty array (a scatter's index constant?) enters the shard_map"
print("OK")
"""


def test_kernels_on_a_partly_split_mesh_lower_to_what_the_gpu_compiles():
    run_on_cpu_devices(PARTLY_SPLIT_SCRIPT, 2)
