"""S^3-style search of USF solver schedules (`dsno.solvers.usf`) for one teacher and NFE budget:
`python -m dsno.search experiment=mnist_gmm nfe=5` writes runs/<experiment>/solver_schedules/nfe5.yaml.

space: the candidates (draws, mutation, crossover, encoding); predictor: the performance
predictor; records: a scored candidate and the search state (<name>.scored.json); conditioning: the
labels and guidance of a class-conditional teacher's search; loop: scoring, the search rounds,
verification and resume.
"""

from dsno.search.loop import SearchConfig, SearchError, search
from dsno.search.predictor import Predictor, kendall_tau
from dsno.search.space import Space

__all__ = ["SearchConfig", "SearchError", "search", "Predictor", "kendall_tau", "Space"]
