"""A SOAP-like preconditioner in ~30 lines on fastcurv.ops: Adam's moments kept in the eigenbasis of Shampoo's
factors L = EMA(G Gᵀ), R = EMA(Gᵀ G), whose updates are kron_factor_update_ (one fused SYRK each on GPU).
The full method, with the details that matter (first-step skip, QR refresh, moment transport), is
fastcurv.optim.SOAP.    python examples/soap_like.py
"""

import torch

from fastcurv.ops import kron_factor_update_


class SoapLike(torch.optim.Optimizer):
    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), eps=1e-8, every=10):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, every=every))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), every = group["betas"], group["every"]
            for p in (p for p in group["params"] if p.grad is not None):
                G, st = p.grad.reshape(p.shape[0], -1), self.state[p]  # a bias is a (d, 1) matrix
                if not st:  # factors, bases and moments (in the basis) start at zero
                    st.update(t=0, m=torch.zeros_like(G), v=torch.zeros_like(G),
                              L=G.new_zeros(G.shape[0], G.shape[0]), R=G.new_zeros(G.shape[1], G.shape[1]))
                if st["t"] > 0:  # the first step only collects statistics, as SOAP does
                    Gp = st["QL"].T @ G @ st["QR"]
                    st["m"].lerp_(Gp, 1 - b1)
                    st["v"].mul_(b2).addcmul_(Gp, Gp, value=1 - b2)
                    size = group["lr"] * (1 - b2 ** st["t"]) ** 0.5 / (1 - b1 ** st["t"])
                    p.sub_(size * (st["QL"] @ (st["m"] / (st["v"].sqrt() + group["eps"])) @ st["QR"].T).view_as(p))
                kron_factor_update_(st["L"], G.T, b2, normalize=False)  # L <- b2 L + (1 - b2) G G^T
                kron_factor_update_(st["R"], G, b2, normalize=False)    # R <- b2 R + (1 - b2) G^T G
                if st["t"] % every == 0:  # new eigenbasis; carry the first moment over to it
                    m = st["QL"] @ st["m"] @ st["QR"].T if st["t"] else st["m"]
                    st["QL"], st["QR"] = (torch.linalg.eigh(F)[1] for F in (st["L"], st["R"]))
                    st["m"] = st["QL"].T @ m @ st["QR"]
                st["t"] += 1


if __name__ == "__main__":
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 20))
    x = torch.randn(256, 20)
    opt = SoapLike(model.parameters(), lr=1e-2)
    for k in range(101):
        opt.zero_grad()
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
        if k % 25 == 0:
            print(f"step {k:3d}  loss {loss.item():.4f}")
