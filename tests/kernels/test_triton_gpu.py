"""What only a GPU can show: the launches follow the tensors' device, and CUDA-graph replays with
dropout draw new masks (the seed lives in a device tensor). Skipped without CUDA."""
import pytest
import torch

import kernels
from builders import assert_close, make_lora, make_weight, rand, ref_forward

pytestmark = pytest.mark.requires_cuda


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device_not_the_current_one():
    """device_map="auto" puts layers on several GPUs while torch's current device stays cuda:0."""
    M, K, N = 40, 320, 333
    weight, W64 = make_weight("nf4", N, K)
    dev = torch.device("cuda:1")
    import dataclasses

    w1 = dataclasses.replace(weight, packed=weight.packed.to(dev), absmax=weight.absmax.to(dev),
                             code=weight.code.to(dev),
                             nested=dataclasses.replace(weight.nested, code=weight.nested.code.to(dev),
                                                        absmax=weight.nested.absmax.to(dev)))
    A, B = (t.to(dev) for t in make_lora(N, K, 8))
    x = rand((M, K), torch.bfloat16).to(dev).requires_grad_()
    with torch.cuda.device(0):
        y = kernels.lora_linear(x, w1, None, A, B, 2.0, backend="triton")
        y.float().sum().backward()
    assert y.device == dev and x.grad.device == dev
    y_ref, _, mag, _ = ref_forward(x.detach().cpu(), W64.cpu(), None, A.cpu(), B.cpu(), 2.0, 0.0, None)
    assert_close("y", y.cpu(), y_ref, mag, x.dtype)


def test_cuda_graph_replays_draw_new_dropout_masks():
    M, K, N = 64, 256, 128
    weight, _ = make_weight("nf4", N, K)
    A, B = make_lora(N, K, 8)
    x = rand((M, K), torch.bfloat16)
    call = lambda: kernels.lora_linear(x, weight, None, A, B, 2.0, 0.5, training=True, backend="triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()  # warm-up outside the capture: autotuning and compiles
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call()
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(y.clone())
    assert not torch.equal(outs[0], outs[1])  # the seed is drawn on the device at every replay
