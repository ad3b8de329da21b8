import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def flower_identity():
    """Flower's Message constructor needs a task identity, which a real run sets; tests set one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
