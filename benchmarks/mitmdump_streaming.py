"""A mitmdump script for the plain-mitmdump baseline of small_requests.py: it streams request and response
bodies as keycourier does, so the comparison is of like with like."""


def requestheaders(flow):
    flow.request.stream = True


def responseheaders(flow):
    flow.response.stream = True
