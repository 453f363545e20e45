"""The OpenAPI 3.1 description of the JSON API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from mycodist import __version__
from mycodist.catalog import EDIBILITY
from mycodist.verdict import VERDICT_CODES, WARNING


def openapi_document(max_upload_bytes: int, max_pixels: int) -> dict[str, Any]:
    error = {"$ref": "#/components/schemas/Error"}
    err = {"application/json": {"schema": error}}
    image_body = {
        "required": True,
        "description": f"A JPEG, PNG, WebP, GIF or BMP photo of at most {max_upload_bytes:,} bytes and "
                       f"{max_pixels:,} pixels, as multipart field `image` or as the raw body.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                               "properties": {"image": {"type": "string", "format": "binary"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    species_schema = {
        "type": "object",
        "required": ["label", "scientific_name", "common_name", "edibility"],
        "properties": {
            "label": {"type": "string"}, "scientific_name": {"type": "string"}, "common_name": {"type": "string"},
            "family": {"type": "string"}, "edibility": {"type": "string", "enum": list(EDIBILITY)},
            "lookalikes": {"type": "array", "items": {"type": "string"}},
        },
    }
    model_schema = {"type": "object", "required": ["id", "version"],
                    "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                   "version": {"type": "string"}, "sha256": {"type": "string"},
                                   "runtime": {"enum": ["torch", "onnxruntime"]}, "precision": {"enum": ["fp32", "int8"]}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mycodist mushroom photo assessment", "version": __version__,
                 "description": "Photo → likely species and a cautious edibility verdict. " + WARNING},
        "paths": {
            "/api/v1/predict": {"post": {
                "summary": "Top-k species and a verdict for one photo",
                "requestBody": image_body,
                "responses": {
                    "200": {"description": "the assessment",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Prediction"}}}},
                    "400": {"description": "not an image, truncated, empty, too many pixels, or no `image` field",
                            "content": err},
                    "413": {"description": f"upload larger than {max_upload_bytes:,} bytes", "content": err},
                    "408": {"description": "the body did not arrive within the upload deadline", "content": err},
                    "415": {"description": "unsupported content type or content encoding", "content": err},
                    "429": {"description": "too many requests in progress from this address; see Retry-After",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}}, "content": err},
                    "503": {"description": "busy: the queue is full; see Retry-After",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}}, "content": err},
                },
            }},
            "/api/v1/species": {"get": {
                "summary": "The species the model knows, in class order",
                "responses": {"200": {"description": "species list", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["species", "warning"],
                    "properties": {"species": {"type": "array", "items": species_schema},
                                   "warning": {"type": "string"}, "model": model_schema}}}}}},
            }},
            "/healthz": {"get": {
                "summary": "Liveness and queue state",
                "responses": {"200": {"description": "alive", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["status"],
                    "properties": {"status": {"const": "ok"}, "model": model_schema,
                                   "queue": {"type": "object"}}}}}}},
            }},
            "/api/v1/openapi.json": {"get": {"summary": "This document",
                                             "responses": {"200": {"description": "OpenAPI 3.1 document"}}}},
        },
        "components": {"schemas": {
            "Prediction": {
                "type": "object", "required": ["top_k", "verdict", "warning", "model"],
                "properties": {
                    "top_k": {"type": "array", "items": {
                        "type": "object",
                        "required": ["label", "scientific_name", "common_name", "probability", "edibility"],
                        "properties": {"label": {"type": "string"}, "scientific_name": {"type": "string"},
                                       "common_name": {"type": "string"}, "family": {"type": "string"},
                                       "probability": {"type": "number", "minimum": 0, "maximum": 1},
                                       "edibility": {"type": "string", "enum": list(EDIBILITY)}}}},
                    "verdict": {"type": "object", "required": ["code", "message"],
                                "properties": {"code": {"type": "string", "enum": list(VERDICT_CODES)},
                                               "message": {"type": "string"},
                                               "reasons": {"type": "array", "items": {"type": "string"},
                                                           "description": "'rule: detail' for every rule that fired"},
                                               "rules": {"type": "array", "items": {"type": "string"}},
                                               "lookalikes": {"type": "array", "description": (
                                                   "known lookalikes of the top species; probability is null "
                                                   "when the lookalike is not one of the model's classes"),
                                                   "items": {"type": "object", "properties": {
                                                       "label": {"type": "string"},
                                                       "scientific_name": {"type": "string"},
                                                       "edibility": {"type": "string", "enum": list(EDIBILITY)},
                                                       "syndrome": {"type": "string"},
                                                       "features": {"type": "string"},
                                                       "citation": {"type": "string"},
                                                       "in_classes": {"type": "boolean"},
                                                       "probability": {"type": ["number", "null"]}}}}}},
                    "warning": {"type": "string"},
                    "model": model_schema,
                    "ood": {"type": ["object", "null"]},
                    "image": {"type": "object", "properties": {"width": {"type": "integer"},
                                                               "height": {"type": "integer"}}},
                },
            },
            "Error": {"type": "object", "required": ["error", "warning"],
                      "properties": {"error": {"type": "object", "required": ["status", "message"],
                                               "properties": {"status": {"type": "integer"},
                                                              "message": {"type": "string"}}},
                                     "warning": {"type": "string"}}},
        }},
    }
