"""benchmarks/aot_compile.py's reading of compiled HLO: bytes by memory space and by model part.

The HLO below is written by hand in XLA:TPU's text format (the layouts, memory spaces and async
copies of a real v5e compile, cut down); every expected figure is worked out here from the shapes.
"""

from benchmarks import aot_compile

HLO = """\
HloModule jit_train_step, is_scheduled=true

%fused_computation.1 (param_0: bf16[8,16,16,64]) -> bf16[8,16,16,64] {
  %param_0 = bf16[8,16,16,64]{3,0,2,1:T(8,128)(2,1)} parameter(0)
  ROOT %negate.1 = bf16[8,16,16,64]{3,0,2,1:T(8,128)(2,1)} negate(%param_0)
}

ENTRY %main.1_spmd (param.1: f32[3,3,64,64], param.2: bf16[8,16,16,64]) -> bf16[8,16,16,64] {
  %param.1 = f32[3,3,64,64]{3,2,1,0:T(8,128)} parameter(0), metadata={op_name="state['params']"}
  %param.2 = bf16[8,16,16,64]{3,0,2,1:T(8,128)(2,1)} parameter(1)
  %copy-start.1 = (f32[3,3,64,64]{3,2,1,0:T(8,128)S(1)}, f32[3,3,64,64]{3,2,1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%param.1)
  %copy-done.1 = f32[3,3,64,64]{3,2,1,0:T(8,128)S(1)} copy-done(%copy-start.1)
  %fusion.1 = bf16[8,16,16,64]{3,0,2,1:T(8,128)(2,1)} fusion(%param.2), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(SSD)/vgg/conv1_2/conv/conv_general_dilated"}
  %fusion.2 = bf16[8,16,16,64]{3,0,2,1:T(8,128)(2,1)S(1)} fusion(%fusion.1, %copy-done.1), kind=kOutput, calls=%fused_computation.1, metadata={op_name="jit(train_step)/transpose(jvp(SSD))/fusion1_conf/conv_general_dilated"}
  ROOT %fusion.3 = bf16[8,16,16,64]{3,0,2,1:T(8,128)(2,1)} fusion(%fusion.2), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp()/shard_map/reduce_sum"}
}
"""

MAP = 8 * 16 * 16 * 128 * 2      # bf16[8,16,16,64]: 64 channels take 128 lanes (T(8,128))
KERNEL = 3 * 3 * 64 * 128 * 4    # f32[3,3,64,64]{3,2,1,0}: minor 64 -> 128, next 64 a multiple of 8


def test_tiled_bytes_round_the_layouts_tiles_up():
  assert aot_compile.tiled_bytes("bf16", "8,16,16,64", "{3,0,2,1:T(8,128)(2,1)}") == MAP
  assert aot_compile.tiled_bytes("f32", "3,3,64,64", "{3,2,1,0:T(8,128)}") == KERNEL
  # The second-minor dimension rounds to 8: f32[5,4] stored {1,0} with T(8,128) -> 8 x 128.
  assert aot_compile.tiled_bytes("f32", "5,4", "{1,0:T(8,128)}") == 8 * 128 * 4
  assert aot_compile.tiled_bytes("s32", "7", "{0:T(128)}") == 128 * 4
  assert aot_compile.tiled_bytes("f32", "2,3", "") == 24            # no layout: as declared


def test_hlo_traffic_splits_hbm_from_on_chip_and_names_the_parts():
  traffic = aot_compile.hlo_traffic(HLO)
  # copy-start: reads the kernel from HBM, writes its on-chip copy (S(1)); the scalar u32 context is
  # on chip too (S(2)). fusion.1: HBM map in, HBM map out. fusion.2: the HBM map and the on-chip
  # kernel in, an on-chip map out. fusion.3: the on-chip map in, an HBM map out. The fused
  # computation is inside fusion.1-3 and counts nothing of its own; copy-done counts nothing.
  hbm = KERNEL + (MAP + MAP) + MAP + MAP
  on_chip = (KERNEL + 4) + (KERNEL + MAP) + MAP   # u32[] has no tiles: 4 bytes
  assert (traffic["hbm"], traffic["on_chip"]) == (hbm, on_chip)
  assert traffic["parts"] == {
      "forward conv1": 2 * MAP,
      "backward heads": MAP,
      "matching + loss": MAP,
      "state and compiler copies": KERNEL,
  }


def test_model_part_reads_flax_name_stacks():
  part = aot_compile.model_part
  assert part("jit(train_step)/jvp(SSD)/vgg/conv4_3/conv/cond/branch_0_fun/conv") == "forward conv4"
  assert part("jit(train_step)/transpose(jvp(SSD))/vgg/cond/branch_0_fun/select_and_scatter") == (
      "backward pools")
  assert part("jit(train_step)/jvp(SSD)/vgg/conv6/conv/conv_general_dilated") == "forward conv6-7"
  assert part("jit(train_step)/transpose(jvp(SSD))/fusion2/deconv1/conv") == "backward fusion2"
  assert part("jit(train_step)/jvp(SSD)/conv8_2_loc/conv") == "forward heads"
  assert part("jit(train_step)/transpose(jvp(SSD))/conv9_1/conv/conv") == "backward extra layers"
  assert part("jit(train_step)/jvp(SSD)/reshape") == "forward head outputs"
  assert part("jit(train_step)/jvp()/shard_map/while/body/select_n") == "matching + loss"
  assert part("jit(train_step)/jit(_where)/select_n") == "optimizer + update"
  assert part("") == "state and compiler copies"


def test_breakdown_splits_each_part_into_per_image_and_fixed_bytes():
  small = dict(per_chip_batch=2, hbm_traffic_bytes=10e9, hbm_traffic_parts={"a": 6e9, "b": 4e9})
  large = dict(per_chip_batch=32, hbm_traffic_bytes=40e9, hbm_traffic_parts={"a": 36e9, "b": 4e9})
  rows = aot_compile.breakdown(small, large).splitlines()
  # a: (36 - 6) / 30 = 1 GB per image, 36 - 32 = 4 GB fixed; b: nothing per image, all fixed.
  assert rows[2] == "| a | 6.00 | 36.00 | 1000.0 | 4.00 | 90.0 % |"
  assert rows[3] == "| b | 4.00 | 4.00 | 0.0 | 4.00 | 10.0 % |"
  assert rows[4] == "| **all** | 10.00 | 40.00 | 1000.0 | 8.00 | 100 % |"
  # Parts under min_share of the larger compile's bytes are summed in one row.
  rows = aot_compile.breakdown(small, large, min_share=0.2).splitlines()
  assert rows[3] == "| the other parts (each < 20 %) | 4.00 | 4.00 | 0.0 | 4.00 | 10.0 % |"
