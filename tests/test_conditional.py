"""Class-conditional teachers and classifier-free guidance.

1. The guidance rule: (1 + w) f(x, t, y) - w f(x, t, null), from one teacher call of 2B rows; w = 0
   is the conditional teacher; no labels leave an unconditional teacher untouched.
2. Every registered solver takes `cond=` and gives what it gives on the teacher pre-bound to the labels.
3. Under guidance, solvers converge at their nominal orders (the cases of test_solver_orders) to the
   exact solution of a linear guided ODE (a Gaussian class, a Gaussian null branch; w = 1, where the
   order-4 Adams-type DEIS variants show ~3.75 from their lower-order warm-up steps), and every ODE
   solver converges to a DOP853 solve of the guided ODE of a single-Gaussian-per-class mixture (whose
   null branch is a mixture, so that ODE has no closed form).
4. The conditional MNIST mixture: per-class denoiser against a brute-force sum over components; its
   null label is the unconditional GaussianMixture of the same components; the shipped fit is
   what its command makes.
5. Labels that do not fit: one line.
"""

import math

import pytest
import torch
from scipy.integrate import quad, solve_ivp

from dsno.errors import UserError
from dsno.schedules import VPSchedule
from dsno.solvers import available, get, solve, timesteps, usf
from dsno.solvers.reference import reference_solve
from dsno.teachers import ConditionalGaussianMixture, GaussianMixture
from dsno.teachers.base import Teacher
from dsno.teachers.conditional import ConditionedTeacher, GuidanceError, LabelError, row_labels

from test_solver_orders import LOGSNR, MIXTURE, STEPS, T_END, case_id, check_order


class ToyConditional(Teacher):
    """A class-conditional eps network of 3 classes: a nonlinear function of x, t and the label
    (the null label 3 too); records the rows of each call."""

    prediction = "eps"
    num_classes = 3

    def __init__(self, supports_guidance=True, guidance=0.0):
        super().__init__()
        self.schedule = VPSchedule.linear()
        self.supports_guidance = supports_guidance
        self.guidance = guidance
        self.calls = []

    def forward(self, x, t, labels=None):
        labels = row_labels(self, labels, x)
        self.calls.append(x.shape[0])
        shift = (labels.to(x.dtype) - 1.0).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x * (1.0 + 0.3 * shift)) * t.to(x.dtype).reshape(shift.shape) + 0.2 * shift


def class_mixture(per_class=2, classes=3, d=8, guidance=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = per_class * classes
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.8
    variances = 0.05 + 0.3 * torch.rand(k, d, generator=g, dtype=torch.float64)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ConditionalGaussianMixture(means, variances, labels, weights, guidance=guidance)


def noise(b=4, d=8, seed=1):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- 1. the guidance rule ----------------------------------------------------------------------

def test_guidance_is_one_plus_w_conditional_minus_w_null_from_one_call_of_2b_rows():
    teacher, w = ToyConditional(guidance=2.5), 2.5
    x, t, y = noise(), torch.full((4,), 0.4, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    conditional, unconditional = teacher(x, t, labels=y), teacher(x, t, labels=torch.full((4,), 3))
    teacher.calls.clear()
    guided = teacher.conditioned(y).eps(x, 0.4)
    assert teacher.calls == [8]
    assert torch.equal(guided, (1 + w) * conditional - w * unconditional)
    assert float((guided - conditional).abs().max()) > 0.1
    teacher.calls.clear()
    solve(teacher, x, timesteps(teacher.schedule, 5), solver="ddim", cond=y)
    assert teacher.calls == [8] * 5


def test_guidance_rule_holds_in_every_prediction_of_an_x0_teacher():
    teacher, w = class_mixture(guidance=1.5), 1.5
    x, y = noise(), torch.tensor([0, 1, 2, 0])
    bound, conditional = teacher.conditioned(y), teacher.conditioned(y, guidance=0.0)
    for kind in ("x0", "eps", "v"):
        want = (1 + w) * conditional.predict(x, 0.3, kind) - w * teacher.predict(x, 0.3, kind)
        assert torch.allclose(bound.predict(x, 0.3, kind), want, atol=1e-12, rtol=0)


def test_zero_guidance_is_the_conditional_teacher_in_one_call():
    teacher = ToyConditional(guidance=0.0)
    x, t, y = noise(), torch.full((4,), 0.7, dtype=torch.float64), torch.tensor([2, 2, 0, 1])
    want = teacher(x, t, labels=y)
    teacher.calls.clear()
    assert torch.equal(teacher.conditioned(y).eps(x, 0.7), want)
    assert torch.equal(ToyConditional(guidance=3.0).conditioned(y, guidance=0).eps(x, 0.7), want)
    assert teacher.calls == [4]


def test_without_labels_a_teacher_is_solved_unchanged():
    plain = GaussianMixture(torch.zeros(1, 8, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert plain.conditioned(None) is plain
    mixture = class_mixture()
    assert mixture.conditioned(None) is mixture
    x, ts = noise(), timesteps(mixture.schedule, 6)
    assert torch.equal(solve(mixture, x, ts, cond=None), solve(mixture.marginal(), x, ts))


# --- 2. every solver passes the condition through -----------------------------------------------

def solve_with(name, teacher, x, **kw):
    spec = get(name)
    if spec.grid is not None:                     # usf: a solver schedule of its own
        ts = timesteps(teacher.schedule, 6, spacing="time_quadratic")
        return solve(teacher, x, solver=name, solver_schedule=usf.from_solver("dpm_solver_pp", ts, 2), **kw)
    opts = {"generator": torch.Generator().manual_seed(5)} if "generator" in spec.options else {}
    return solve(teacher, x, timesteps(teacher.schedule, 6), solver=name, **opts, **kw)


@pytest.mark.parametrize("name", available())
def test_every_solver_takes_cond_as_the_teacher_bound_to_it(name):
    teacher, x = class_mixture(guidance=2.0), noise()
    y = torch.tensor([0, 1, 2, 1])
    got = solve_with(name, teacher, x, cond=y)
    assert torch.equal(got, solve_with(name, teacher.conditioned(y), x))
    other = solve_with(name, teacher, x, cond=torch.tensor([2, 0, 1, 0]))
    assert float((got - other).abs().amax(dim=1).min()) > 0.05, "the labels reach the teacher of every row"


# --- 3. convergence under guidance ---------------------------------------------------------------

class ClassAndNull(Teacher):
    """One class, a Gaussian N(m_c, v_c), and a Gaussian null branch N(m_u, v_u): the guided x0 is
    affine in x, so the guided PF-ODE is linear with a closed-form solution (`exact`)."""

    prediction = "x0"
    exact = True
    num_classes = 1
    supports_guidance = True

    def __init__(self, guidance, d=8, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.schedule = VPSchedule.linear()
        self.guidance = guidance
        self.m_c, self.m_u = (torch.randn(d, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
        self.v_c = torch.exp(torch.linspace(math.log(0.05), 0.0, d, dtype=torch.float64))        # 0.05 .. 1
        self.v_u = self.v_c * (1.0 + torch.rand(d, generator=g, dtype=torch.float64))
        self.cls = GaussianMixture(self.m_c[None], self.v_c[None], schedule=self.schedule)
        self.null = GaussianMixture(self.m_u[None], self.v_u[None], schedule=self.schedule)

    def forward(self, x, t, labels=None):
        labels = row_labels(self, labels, x)
        return torch.where((labels == self.num_classes)[:, None], self.null(x, t), self.cls(x, t))

    def exact_solution(self, x_s, s, t):
        """In y = x / alpha, rho = sigma / alpha: dy/drho = k y - q per dimension with
        k = (1 + w) rho / (v_c + rho^2) - w rho / (v_u + rho^2), q the same with m_c, m_u on top, so
        y(rho) = Phi(rho) [y_s / Phi(rho_s) + int_rho^rho_s q / Phi], Phi = (v_c + rho^2)^((1+w)/2) (v_u + rho^2)^(-w/2)."""
        w, sch = self.guidance, self.schedule
        rho_s, rho_t = float(sch.sigma(s) / sch.alpha(s)), float(sch.sigma(t) / sch.alpha(t))
        out = torch.empty_like(x_s)
        for i, (mc, mu, vc, vu) in enumerate(zip(self.m_c.tolist(), self.m_u.tolist(), self.v_c.tolist(),
                                                 self.v_u.tolist())):
            phi = lambda r: (vc + r * r) ** ((1 + w) / 2) * (vu + r * r) ** (-w / 2)  # noqa: E731
            q = lambda r: (1 + w) * r * mc / (vc + r * r) - w * r * mu / (vu + r * r)  # noqa: E731
            integral = quad(lambda u: q(math.exp(u)) / phi(math.exp(u)) * math.exp(u), math.log(rho_t),
                            math.log(rho_s), epsabs=1e-15, epsrel=1e-13, limit=500)[0]
            y_s = x_s[:, i] / float(sch.alpha(s))
            out[:, i] = float(sch.alpha(t)) * phi(rho_t) * (y_s / phi(rho_s) + integral)
        return out


GUIDED = ClassAndNull(guidance=1.0)
X_GUIDED = noise(seed=4)
Y_GUIDED = torch.zeros(4, dtype=torch.long)
EXACT_GUIDED = GUIDED.exact_solution(X_GUIDED, 1.0, T_END)


def test_exact_guided_solution_agrees_with_dop853():
    bound, sched = GUIDED.conditioned(Y_GUIDED), GUIDED.schedule

    def pf_ode(t, y):                                        # dx/dt = f(t) (x - eps / sigma)
        x = torch.from_numpy(y).reshape(X_GUIDED.shape)
        return (float(sched.d_log_alpha_dt(t)) * (x - bound.eps(x, t) / float(sched.sigma(t)))).reshape(-1).numpy()

    sol = solve_ivp(pf_ode, (1.0, T_END), X_GUIDED.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-12)
    assert sol.status == 0
    assert float((torch.from_numpy(sol.y[:, -1]).reshape(X_GUIDED.shape) - EXACT_GUIDED).abs().max()) < 1e-8
    unguided = GUIDED.cls.ode_solution(X_GUIDED, 1.0, T_END)
    assert float((EXACT_GUIDED - unguided).abs().max()) > 0.05, "guidance moves the solution"


@pytest.mark.parametrize("solver,order,opts,expected,kind", LOGSNR, ids=[case_id(c) for c in LOGSNR])
def test_observed_order_under_guidance(solver, order, opts, expected, kind):
    errs = [float((solve(GUIDED, X_GUIDED, timesteps(GUIDED.schedule, n), solver=solver, order=order,
                          cond=Y_GUIDED, **opts) - EXACT_GUIDED).abs().max()) for n in STEPS]
    check_order(errs, STEPS, expected, kind == ">=")


@pytest.fixture(scope="module")
def guided_mixture_reference():
    teacher, x = class_mixture(per_class=1, guidance=2.0, seed=2), noise(seed=3)
    y = torch.tensor([0, 1, 2, 0])
    bound, sched = teacher.conditioned(y), teacher.schedule

    def pf_ode(t, state):
        z = torch.from_numpy(state).reshape(x.shape)
        return (float(sched.d_log_alpha_dt(t)) * (z - bound.eps(z, t) / float(sched.sigma(t)))).reshape(-1).numpy()

    sol = solve_ivp(pf_ode, (1.0, T_END), x.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-12)
    assert sol.status == 0
    return teacher, x, y, torch.from_numpy(sol.y[:, -1]).reshape(x.shape)


def test_guided_reference_solve_agrees_with_dop853(guided_mixture_reference):
    teacher, x, y, ref = guided_mixture_reference
    ours = reference_solve(teacher.conditioned(y), x, T_END, steps=2000)
    assert float((ours - ref).abs().max()) < 1e-7


@pytest.mark.parametrize("solver,order,opts", MIXTURE, ids=[case_id(c) for c in MIXTURE])
def test_every_solver_converges_to_the_guided_mixture_reference(guided_mixture_reference, solver, order, opts):
    teacher, x, y, ref = guided_mixture_reference
    steps = (12, 24, 48)
    errs = [float((solve(teacher, x, timesteps(teacher.schedule, n), solver=solver, order=order, cond=y, **opts)
                   - ref).abs().max()) for n in steps]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.3 * errs[0], errs      # first order: 0.25


# --- 4. the class-conditional MNIST mixture -------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_cond():
    from dsno.teachers.mnist_gmm_cond import load_mnist_gmm_cond
    return load_mnist_gmm_cond()


def brute_force_x0(means, variances, log_weights, x, alpha, sigma):
    """E[x0 | x_t = x] of sum_k w_k N(mu_k, diag(v_k)), one component at a time. x: [D]."""
    logs, posts = [], []
    for mu, v, lw in zip(means, variances, log_weights):
        s2 = alpha**2 * v + sigma**2
        logs.append(lw - 0.5 * (((x - alpha * mu) ** 2 / s2).sum() + torch.log(2 * math.pi * s2).sum()))
        posts.append(mu + alpha * v / s2 * (x - alpha * mu))
    r = torch.softmax(torch.stack(logs), 0)
    return sum(ri * p for ri, p in zip(r, posts))


def test_mnist_per_class_denoiser_matches_a_brute_force_sum(mnist_cond):
    teacher = mnist_cond
    assert teacher.num_classes == 10 and teacher.shape == (1, 16, 16) and teacher.supports_guidance
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 3, 7, 9, 3])
    x0 = teacher.means[teacher.component_labels == 5][:5].reshape(5, 1, 16, 16)     # digits of class 5 ...
    t = 0.35
    a, s = float(teacher.schedule.alpha(t)), float(teacher.schedule.sigma(t))
    x = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    got = teacher.conditioned(y).x0(x, t)
    for i, label in enumerate(y.tolist()):                                           # ... denoised as others
        keep = teacher.component_labels == label
        want = brute_force_x0(teacher.means[keep], teacher.variances[keep], teacher.log_weights[keep],
                              x[i].reshape(-1), a, s)
        assert torch.allclose(got[i].reshape(-1), want, atol=1e-10, rtol=0)
        assert torch.allclose(got[i], teacher.class_mixture(label).x0(x[i:i + 1], t)[0], atol=1e-12, rtol=0)
    unconditional = teacher.x0(x, t)
    assert float((got - unconditional).abs().amax(dim=(1, 2, 3)).min()) > 0.1, "the label changes the denoiser"


def test_null_label_is_the_unconditional_mixture_of_the_same_components(mnist_cond):
    teacher = mnist_cond
    plain = GaussianMixture(teacher.means.reshape(-1, 1, 16, 16), teacher.variances.reshape(-1, 1, 16, 16),
                            teacher.log_weights.exp())
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = torch.tensor([0.9, 0.5, 0.5, 0.2, 0.05, 0.01], dtype=torch.float64)
    assert torch.allclose(teacher.x0(x, ts), plain.x0(x, ts), atol=1e-13, rtol=0)
    assert torch.allclose(teacher(x, ts, labels=torch.full((6,), 10)), plain.x0(x, ts), atol=1e-13, rtol=0)
    assert torch.allclose(teacher.class_weights, torch.full((10,), 0.1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(teacher.data_mean, plain.data_mean, atol=1e-13)


def test_guidance_raises_the_label_accuracy_of_mnist_samples(mnist_cond):
    from dsno.metrics.digit_classifier import accuracy, load_digit_classifier
    classifier, teacher = load_digit_classifier(16), mnist_cond
    y = torch.arange(10).repeat(20)
    x = torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = timesteps(teacher.schedule, 20)
    acc = {w: accuracy(classifier, solve(teacher.conditioned(y, guidance=w), x, ts).float().clamp(-1, 1), y)
           for w in (0.0, 3.0)}
    assert acc[0.0] > 0.75 and acc[3.0] > acc[0.0] + 0.08, acc          # measured 0.855 and 0.98


def test_shipped_conditional_mnist_mixture_is_reproducible_from_its_command(mnist_cond):
    from dsno.teachers.mnist_gmm_cond import fit_mnist_gmm_cond
    refit = fit_mnist_gmm_cond(16, 8, seed=0, iters=100)
    assert torch.equal(refit["labels"], mnist_cond.component_labels)
    assert torch.allclose(refit["means"].reshape(80, -1), mnist_cond.means, atol=1e-6)
    assert torch.allclose(refit["weights"], mnist_cond.log_weights.exp(), atol=1e-8)


def test_the_fit_command_writes_a_loadable_mixture_and_missing_files_are_named(tmp_path):
    from dsno.errors import UserFileNotFoundError
    from dsno.teachers.mnist_gmm import asset_path as unconditional_fit
    from dsno.teachers.mnist_gmm_cond import load_mnist_gmm_cond, main
    out = tmp_path / "cond8.safetensors"
    main(["--size", "8", "--per-class", "2", "--iters", "3", "--out", str(out)])
    teacher = load_mnist_gmm_cond(size=8, per_class=2, path=out)
    assert teacher.num_components == 20 and teacher.shape == (1, 8, 8)
    assert torch.equal(teacher.component_labels, torch.arange(10).repeat_interleave(2))
    with pytest.raises(ValueError, match="holds 20 components of 1x8x8 images, but 10 x 8 of 1x16x16 were asked"):
        load_mnist_gmm_cond(path=out)
    with pytest.raises(ValueError, match=r"lacks tensors \['labels'\]; remake it with: python -m dsno.teachers.mnist"):
        load_mnist_gmm_cond(path=unconditional_fit())
    with pytest.raises(UserFileNotFoundError, match="python -m dsno.teachers.mnist_gmm_cond --size 16 --per-class 8"):
        load_mnist_gmm_cond(path=tmp_path / "missing.safetensors")


def test_mixture_classes_need_components_and_integer_labels():
    means, variances = torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"classes \[1\] have no component"):
        ConditionalGaussianMixture(means, variances, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="component_labels must be 3 integers"):
        ConditionalGaussianMixture(means, variances, torch.tensor([0.0, 1.0, 1.0]))


# --- 5. labels that do not fit -----------------------------------------------------------------

def _plain():
    return GaussianMixture(torch.zeros(1, 8, dtype=torch.float64), torch.ones(1, dtype=torch.float64), name="plain")


BAD = [
    ("unconditional", _plain, torch.tensor([0, 1, 2, 0]), "teacher plain is unconditional"),
    ("float", class_mixture, torch.tensor([0.0, 1.0, 2.0, 0.0]), "got dtype torch.float32"),
    ("bool", class_mixture, torch.tensor([True, False, True, True]), "got dtype torch.bool"),
    ("column", class_mixture, torch.tensor([[0], [1], [2], [0]]), r"got shape \(4, 1\)"),
    ("too-large", class_mixture, torch.tensor([0, 1, 3, 0]), r"label 3, outside \[0, 3\)"),
    ("negative", class_mixture, torch.tensor([0, -1, 2, 0]), r"label -1, outside \[0, 3\)"),
    ("batch", class_mixture, torch.tensor([0, 1, 2]), r"cond has shape \(3,\) for a batch of 4"),
    ("string", class_mixture, "cats", "cond must be class labels as a LongTensor"),
    ("needs-labels", lambda: ToyConditional(supports_guidance=False), None, "without an unconditional branch"),
    ("bound-twice", lambda: class_mixture().conditioned(torch.tensor([0, 1, 2, 0])), torch.tensor([0, 1, 2, 0]),
     "already has labels bound"),
]


@pytest.mark.parametrize("case,make,labels,message", BAD, ids=[b[0] for b in BAD])
def test_labels_that_do_not_fit_are_refused_in_one_line(case, make, labels, message):
    with pytest.raises(LabelError, match=message) as e:
        solve(make(), noise(), timesteps(VPSchedule.linear(), 4), cond=labels)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_a_conditional_teacher_without_null_branch_refuses_unlabelled_calls():
    with pytest.raises(LabelError, match="pass cond=labels"):
        ToyConditional(supports_guidance=False).eps(noise(), 0.5)
    assert isinstance(ToyConditional(supports_guidance=False).conditioned(torch.tensor([1])), ConditionedTeacher)


@pytest.mark.parametrize("guidance,make,message", [
    (-0.5, class_mixture, "guidance must be a finite number >= 0"),
    (float("nan"), class_mixture, "guidance must be a finite number >= 0"),
    (True, class_mixture, "guidance must be a finite number >= 0"),
    (1.0, lambda: ToyConditional(supports_guidance=False), "cannot be guided"),
])
def test_bad_guidance_is_refused_in_one_line(guidance, make, message):
    with pytest.raises(GuidanceError, match=message) as e:
        make().conditioned(torch.tensor([0, 1, 2, 0]), guidance=guidance)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_guidance_without_labels_is_refused_in_one_line():
    with pytest.raises(GuidanceError, match="guidance 1.5 needs class labels: pass cond=labels") as e:
        solve(class_mixture(guidance=1.5), noise(), timesteps(VPSchedule.linear(), 4))
    assert "\n" not in str(e.value)


def test_a_mixture_is_built_with_a_valid_guidance_only():
    with pytest.raises(GuidanceError, match="guidance must be a finite number >= 0"):
        class_mixture(guidance=-1.0)
