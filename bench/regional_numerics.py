"""Numerics of backend_options={"regional": True} against the flat inductor compile: the compute graph of a narrow
Flux (3 dual + 6 single blocks, compile_depth.narrow_flux) compiled both ways in one process, outputs compared at two
timesteps (relative Frobenius error), and both against the uncompiled graph. Output: bench/results/regional_numerics.txt

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 OMP_NUM_THREADS=1 python bench/regional_numerics.py
"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
torch.set_num_threads(1)
from compile_depth import narrow_flux
from tcpade_fx.passes.pipeline import build_graphs
from tcpade_fx.backends.inductor import compile_inductor
m,kw=narrow_flux(3,6)
g=build_graphs(m,kw)
counts={}
def oc(n): counts[n]=counts.get(n,0)+1
with torch.no_grad():
    ref=g.compute(*g.leaves)
    t=time.time(); flat=compile_inductor(g.compute,'compute',oc); a=flat(*g.leaves); tf=time.time()-t
    t=time.time(); reg=compile_inductor(g.compute,'compute',oc,regional=True); b=reg(*g.leaves); tr=time.time()-t
    # another timestep: same compiled code
    leaves2=list(g.leaves); leaves2[g.timestep_position]=torch.full((1,),0.5)
    a2=flat(*leaves2); b2=reg(*leaves2); ref2=g.compute(*leaves2)
rel=lambda x,y: float((x-y).norm()/y.norm())
print('compiles',counts, 'flat %.1fs regional %.1fs (first call incl. compile, 3+6 blocks)'%(tf,tr))
for name,(x,y,z) in {'t=1':(a,b,ref),'t=0.5':(a2,b2,ref2)}.items():
    print(name,'regional vs flat', [rel(p,q) for p,q in zip(y,x)], 'regional vs graph eager',[rel(p,q) for p,q in zip(y,z)], 'flat vs eager',[rel(p,q) for p,q in zip(x,z)])
