# SCAFFOLD: replaced by the op's implementation
def moe_route(*args, **kwargs):
    raise NotImplementedError
