"""torch.compile(eager linear+CE) vs fastft vs eager, fwd+bwd, N=4096 H=576 V=49152, alternating."""
import time, statistics, torch, torch.nn.functional as F, os
from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
N,H,V=4096,576,49152
for dt in (torch.float32, torch.bfloat16):
    g=torch.Generator().manual_seed(0)
    h=torch.randn(N,H,generator=g,dtype=dt); w=torch.randn(V,H,generator=g,dtype=dt).mul_(H**-0.5); y=torch.randint(0,V,(N,),generator=g)
    comp=torch.compile(lambda a,b,c: F.cross_entropy(F.linear(a,b).float(), c))
    def run(f):
        hh=h.detach().requires_grad_(); t=time.perf_counter(); l=f(hh,w,y); l.backward(); return time.perf_counter()-t, l.detach(), hh.grad
    fns={"fastft": lambda a,b,c: fused_linear_cross_entropy(a,b,c), "eager": lambda a,b,c: F.cross_entropy(F.linear(a,b).float(), c), "compile": comp}
    t0=time.perf_counter(); _, lc, gc = run(comp); tc=time.perf_counter()-t0
    _, le, ge = run(fns["eager"])
    print(dt, "compile warm-up (incl. compilation) %.1f s; loss diff %.2e, dh rel err %.2e" % (tc, (lc-le).abs().item(), ((gc.float()-ge.float()).abs().max()/ge.float().abs().max()).item()), flush=True)
    ts={k:[] for k in fns}
    for _ in range(3):
        for k,f in fns.items(): ts[k].append(run(f)[0])
    med={k:statistics.median(v) for k,v in ts.items()}
    print(dt, {k: round(v,3) for k,v in med.items()}, "fastft/compile %.3f, compile/eager %.3f, load %.2f" % (med["fastft"]/med["compile"], med["compile"]/med["eager"], os.getloadavg()[0]), flush=True)
