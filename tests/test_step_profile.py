"""The step profile joins trace events with the optimised HLO they ran: kinds, phases, layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from gmae_jax.bench import step_profile

# The shapes of XLA's text: a fused conv without metadata (its user names it), a cuDNN custom call
# with a tuple result, a dot, a reduce and an elementwise fusion.
HLO = """HloModule jit_train_step, is_scheduled=true

%fused_computation.1 (param_0: f32[8,4,4,3], param_1: f32[3,3,3,5]) -> f32[8,4,4,5] {
  %param_0 = f32[8,4,4,3]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,3,5]{3,2,1,0} parameter(1)
  ROOT %convolution.7 = f32[8,4,4,5]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3}, dim_labels=b01f_01io->b01f
}

%fused_computation.2 (param_0.1: f32[8,5]) -> f32[8,5] {
  %param_0.1 = f32[8,5]{1,0} parameter(0)
  ROOT %exponential.1 = f32[8,5]{1,0} exponential(%param_0.1), metadata={op_name="jit(train_step)/jvp(GMAE)/encoder.encode/blocks_3/mscffn/exp"}
}

ENTRY %main.9 (p0: f32[8,4,4,3], p1: f32[3,3,3,5], p2: f32[8,5], p3: f32[5,5]) -> f32[8,5] {
  %p0 = f32[8,4,4,3]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,3,5]{3,2,1,0} parameter(1)
  %p2 = f32[8,5]{1,0} parameter(2)
  %p3 = f32[5,5]{1,0} parameter(3)
  %ynn_fusion.3 = f32[8,4,4,5]{3,2,1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.1
  %copy_fusion.4 = f32[8,4,4,5]{3,2,1,0} copy(%ynn_fusion.3), metadata={op_name="jit(train_step)/transpose(jvp(GMAE))/GMAE.encode/encoder.encode/blocks_0/msdc/dconv2/conv/conv_general_dilated"}
  %cudnn-conv.5 = (f32[8,4,4,5]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(GMAE)/decoder_blocks_1/msdc/dconv1/conv/conv_general_dilated"}
  %dot.6 = f32[8,5]{1,0} dot(%p2, %p3), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp(GMAE)/GMAE.encode/encoder.encode/blocks_11/mscffn/fc1/dot_general"}
  %reduce.8 = f32[8]{0} reduce(%p2, %p2), dimensions={1}, to_apply=%fused_computation.2, metadata={op_name="jit(train_step)/jvp(GMAE)/encoder.encode/norm/reduce_sum"}
  %loop_fusion.9 = f32[8,5]{1,0} fusion(%dot.6), kind=kLoop, calls=%fused_computation.2
  %all-reduce.11 = (f32[8,5]{1,0}, f32[5,5]{1,0}) all-reduce(%p2, %p3), replica_groups={{0,1}}, to_apply=%fused_computation.2, metadata={op_name="jit(train_step)/transpose(jvp(GMAE))/(decoder_pred/dot_general:encoder/norm/mul)"}
  %while.12 = (s32[], f32[8,5]{1,0}) while(%p2), condition=%fused_computation.2, body=%fused_computation.2, metadata={op_name="jit(train_step)/jvp(GMAE)/blocks_0/attn/while"}
  ROOT %multiply.10 = f32[8,5]{1,0} multiply(%p2, %p2), metadata={op_name="jit(train_step)/mul"}
}
"""


def grouped(op: step_profile.HloOp) -> tuple[str, str, str]:
    return op.kind, op.phase, op.layer


def test_hlo_ops_get_a_kind_a_phase_and_a_layer():
    ops = step_profile.parse_hlo(HLO)
    assert grouped(ops["ynn_fusion.3"]) == ("convolution", "backward", "encoder/blocks/msdc/dconv2/conv")
    assert grouped(ops["cudnn-conv.5"]) == ("convolution", "forward", "decoder_blocks/msdc/dconv1/conv")
    assert grouped(ops["dot.6"]) == ("matmul", "forward", "encoder/blocks/mscffn/fc1")
    assert ops["reduce.8"].kind == "reduction" and ops["reduce.8"].layer == "encoder/norm"
    assert grouped(ops["loop_fusion.9"]) == ("elementwise", "forward", "encoder/blocks/mscffn")
    assert ops["copy_fusion.4"].kind == "data movement"
    assert grouped(ops["multiply.10"]) == ("elementwise", "optimiser and other", "")
    assert grouped(ops["all-reduce.11"]) == ("communication", "backward", "(several layers)")
    assert ops["while.12"].kind == step_profile.CONTAINER  # its body's ops are traced on their own
    # The ops of no layer appear under one name in the phase and the layer tables.
    profile = step_profile.StepProfile({"multiply.10": 2.0, "dot.6": 1.0}, ops, 3.0)
    assert dict(profile.by("layer"))["optimiser and other"] == dict(profile.by("phase"))["optimiser and other"] == 2.0


def test_each_op_knows_its_result_and_the_bytes_it_reads_and_writes():
    ops = step_profile.parse_hlo(HLO)
    image, kernel, small, square = 8 * 4 * 4 * 3 * 4, 3 * 3 * 3 * 5 * 4, 8 * 5 * 4, 5 * 5 * 4
    assert (ops["dot.6"].shape, ops["dot.6"].bytes) == ("f32[8,5]", small + small + square)
    # A library call's byte workspace is scratch, not data.
    conv_result = 8 * 4 * 4 * 5 * 4
    assert (ops["cudnn-conv.5"].shape, ops["cudnn-conv.5"].bytes) == ("f32[8,4,4,5]", conv_result + image + kernel)
    assert (ops["all-reduce.11"].shape, ops["all-reduce.11"].bytes) == ("(f32[8,5], f32[5,5])", 2 * (small + square))
    assert step_profile.array_bytes("(bf16[8,4]{1,0}, pred[3]{0}, s32[])") == 64 + 3 + 4
    profile = step_profile.StepProfile({"dot.6": 1.0, "cudnn-conv.5": 2.0, "loop_fusion.9": 0.5}, ops, 4.0)
    assert profile.gigabytes("matmul") == ops["dot.6"].bytes / 1e9
    assert profile.gigabytes("convolution") == ops["cudnn-conv.5"].bytes / 1e9  # ynn_fusion.3 did not run


@pytest.mark.parametrize("op_name, layer", [
    ("jit(train_step)/transpose(jvp(GMAE))/GMAE.encode/encoder.encode/blocks_0/mscffn/fc1/dot_general",
     "encoder/blocks/mscffn/fc1"),
    ("jit(train_step)/jvp(GMAE)/encoder.encode/blocks_1/attn/...qhd,...khd->...hqk/dot_general", "encoder/blocks/attn"),
    ("jit(train_step)/jvp(GMAE)/blocks_1/attn/while/body/closed_call/add", "blocks/attn"),
    ("jit(train_step)/sqrt", ""),
    ("jit(train_step)/jvp(GMAE)/blocks_0/msdc/(dconv3/bn/reduce_sum:dconv1/bn/reduce_sum)", "blocks/msdc"),
])
def test_layer_names_drop_transforms_block_numbers_and_the_primitive(op_name, layer):
    assert step_profile.layer_of(op_name) == layer


def _event(pid, op, dur_us, module="jit_train_step", **args):
    return {"ph": "X", "pid": pid, "name": op, "dur": dur_us, "args": {"hlo_op": op, "hlo_module": module, **args}}


def test_device_events_are_preferred_and_other_modules_ignored():
    names = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
             {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
    events = names + [_event(1, "dot.6", 9000), _event(2, "dot.6", 3000), _event(2, "dot.6", 1000),
                      _event(2, "other.1", 5000, module="jit_make_batch"), {"ph": "X", "pid": 2, "name": "x", "dur": 7}]
    assert step_profile.ms_per_op(step_profile.step_events(events, "jit_train_step"), 2) == {"dot.6": 2.0}
    host_only = names[:1] + [_event(1, "dot.6", 9000)]
    assert step_profile.ms_per_op(step_profile.step_events(host_only, "jit_train_step"), 3) == {"dot.6": 3.0}
    # Several devices run every op: one device's time counts (the first GPU, or CPU device 0 of 8).
    two_gpus = names + [{"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/device:GPU:1"}},
                        _event(2, "dot.6", 3000), _event(3, "dot.6", 8000)]
    assert step_profile.ms_per_op(step_profile.step_events(two_gpus, "jit_train_step"), 1) == {"dot.6": 3.0}
    cpu_devices = names[:1] + [_event(1, "dot.6", 1000 * (i + 1), device_ordinal=str(i)) for i in range(10)]
    assert step_profile.ms_per_op(step_profile.step_events(cpu_devices, "jit_train_step"), 1) == {"dot.6": 1.0}


def test_a_gpus_kernels_count_once_and_the_time_any_of_them_ran_is_their_union():
    """A GPU's kernels are on its stream lines; should the trace also hold a line that repeats them
    (a derived "XLA Ops" timeline), they must not count twice."""
    names = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
             {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
             {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    kernels = [dict(_event(2, "dot.6", 3000), tid=7, ts=0), dict(_event(2, "dot.6", 1000), tid=7, ts=2000),
               dict(_event(2, "add.1", 1000), tid=7, ts=5000)]
    repeated = [dict(_event(2, "dot.6", 4000), tid=9, ts=0)]
    events = step_profile.step_events(names + kernels + repeated, "jit_train_step")
    assert events == kernels
    assert step_profile.ms_per_op(events, num_steps=1) == {"dot.6": 4.0, "add.1": 1.0}
    assert step_profile.busy_ms(events) == 4.0  # 0-3 and 2-3 ms overlap, then 5-6 ms


def test_a_real_step_is_profiled_by_layer():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(16, (3, 3), name="stem")(x)
            return nn.Dense(256, name="head")(x.reshape(x.shape[0], -1)).sum()

    x = jnp.ones((8, 16, 16, 3))
    params = Net().init(jax.random.key(0), x)

    @jax.jit
    def step(params, x):
        loss, grads = jax.value_and_grad(Net().apply)(params, x)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    result = step_profile.profile_train_step(step, params, x, num_steps=2)
    assert all(result.ops[name].kind != step_profile.CONTAINER for name in result.op_ms)  # no double count
    layers = dict(result.by("layer"))
    assert layers["stem"] > 0 and layers["head"] > 0, layers
    kinds = dict(result.by("kind"))
    assert kinds["convolution"] > 0 and kinds["matmul"] > 0, kinds
    assert {phase for phase, _ in result.by("phase")} >= {"forward", "backward"}
    assert 0 < result.busy_ms <= result.step_ms and result.ops_per_step >= len(result.op_ms)
    table = step_profile.markdown(result, untraced_step_ms=1.5, model_flops=2e9, peak_flops=4e12)
    assert "| convolution |" in table and "| stem |" in table and result.step_ms > 0
    biggest = max(result.op_ms, key=result.op_ms.get)  # the single op table starts with it
    op = result.ops[biggest]
    assert table.split(step_profile.OPS_HEADER + "\n")[1].startswith(
        f"| {biggest} | {op.kind} | {op.phase} | {op.layer or '-'} | {op.shape} | ")
    assert "ms traced step (1.5 ms untraced)" in table
    assert f"{result.ops_per_step:.0f} ops (GPU: kernels) per step; at least one of them running" in table
    # The matmuls' and convolutions' rate: the model's FLOPs over their ops' time, against the peak.
    kinds = dict(result.by("kind"))
    rate = 2e9 / ((kinds["matmul"] + kinds["convolution"]) / 1e3)
    assert (f"matmuls and convolutions: the model's 0.002 TFLOP per step and device in "
            f"{kinds['matmul'] + kinds['convolution']:.1f} ms of their ops, {rate / 1e12:.3g} TFLOP/s, "
            f"{100 * rate / 4e12:.0f} % of the 4 TFLOP/s peak") in table
    matmul_row = next(line for line in table.splitlines() if line.startswith("| matmul |")).strip(" |").split(" | ")
    assert float(matmul_row[3]) == pytest.approx(result.gigabytes("matmul"), abs=0.005) and float(matmul_row[4]) > 0


def test_the_xla_option_that_turns_command_buffers_off_exists():
    """The profile's advice for a step XLA:GPU ran as CUDA graphs names this option (an empty list):
    a renamed or removed option would fail here, as a misspelt one does."""
    lowered = jax.jit(lambda x: (x @ x).sum()).lower(jnp.ones((8, 8)))
    name, value = step_profile.NO_COMMAND_BUFFERS.removeprefix("--").split("=")
    lowered.compile(compiler_options={name: value})
    with pytest.raises(Exception, match="xla_gpu_enable_command_buffe"):
        lowered.compile(compiler_options={name[:-1]: value})


def test_ops_the_hlo_does_not_name_are_reported():
    result = step_profile.StepProfile({"dot.6": 2.0, "command_buffer.3": 5.0}, step_profile.parse_hlo(HLO), 8.0)
    assert dict(result.by("kind")) == {"other": 5.0, "matmul": 2.0}
    table = step_profile.markdown(result)
    assert "5.0 ms in traced ops the HLO does not name (counted as 'other'), e.g. command_buffer.3" in table
    # A step run as CUDA graphs (session 28's H200 profile was one `command_buffer_1`) says how to see its ops.
    assert "5.0 ms ran as CUDA graphs" in table and "XLA_FLAGS=--xla_gpu_enable_command_buffer= " in table
    unnamed = step_profile.StepProfile({"dot.6": 2.0, "fusion.99": 5.0}, step_profile.parse_hlo(HLO), 8.0)
    assert "CUDA graphs" not in step_profile.markdown(unnamed)
