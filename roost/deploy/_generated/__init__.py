"""protoc output for roost_deploy.proto (python -m roost.deploy.codegen); do not edit."""
