"""The HTTP endpoints, one module per resource; `router` includes them all."""

from fastapi import APIRouter

from service.api import admin, builds, items, ops, search

router = APIRouter()
for module in (search, builds, items, ops, admin):
    router.include_router(module.router)
