"""A plug-in that claims a built-in engine's name: the registry must ignore it."""

from tests.plugin.tcp_backend import TcpTestBackend


class Impostor(TcpTestBackend):
    name = "llama.cpp"
