"""The server's OpenAPI 3.1 description, served at ``/openapi.json``: what a client may send, with the limits the
server enforces (``api.RequestLimits``), so that a client generator or a fuzzer (the test suite runs Schemathesis
on it) sees the same rules the handlers check. Written by hand because the handlers read raw JSON (their checks
name the field in OpenAI's error shape, which FastAPI's own validation would not)."""

from __future__ import annotations

from g4v_jax.serve.api import MAX_FPS, UNSUPPORTED, RequestLimits

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": "an error", "content": {"application/json": {"schema": ERROR}}} for c in codes}


def chat_request_schema(limits: RequestLimits, max_videos: int, model_name: str) -> dict:
    text_part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    video_part = {"type": "object", "required": ["type", "video_url"], "additionalProperties": False,
                  "properties": {"type": {"const": "video_url"}, "video_url": {
                      "type": "object", "required": ["url"], "additionalProperties": False,
                      "properties": {"url": {"type": "string", "minLength": 1,
                                             "description": "data:video/<type>;base64,... or file://<name> inside "
                                                            "the media directory"}}}}}
    image_part = {"type": "object", "required": ["type", "image_url"], "additionalProperties": False,
                  "properties": {"type": {"const": "image_url"}, "image_url": {
                      "type": "object", "required": ["url"], "additionalProperties": False,
                      "properties": {"url": {"type": "string", "minLength": 1,
                                             "description": "one frame: data:image/<type>;base64,... or "
                                                            "file://<name> inside the media directory; consecutive "
                                                            "image parts are one video's frames"},
                                                     "detail": {"enum": ["auto", "low", "high"],
                                                                "description": "accepted; every frame is resized to "
                                                                               "the model's input"}}}}}
    sampling = {"type": ["object", "null"], "additionalProperties": False,
                "properties": {"num_frames": {"type": "integer", "minimum": 1,
                                              "description": "at most the model's frames a video"},
                               "fps": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_FPS}}}

    def message(roles: list[str], parts: list[dict]) -> dict:
        content = {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": limits.max_parts,
                                                  "items": {"oneOf": parts}}]}
        return {"type": "object", "required": ["role", "content"],
                "properties": {"role": {"enum": roles}, "content": content, "name": {"type": "string"}}}

    messages = {"oneOf": [message(["system", "developer", "assistant"], [text_part]),
                          message(["user"], [text_part, video_part, image_part])]}
    neutral = {key: {"enum": list(values)} if not isinstance(values[0], dict)
               else {"type": "object", "maxProperties": 0} for key, values in UNSUPPORTED.items()}
    return {
        "type": "object", "required": ["messages"], "additionalProperties": False,
        "description": f"OpenAI's chat completion request; at most {max_videos} videos, "
                       f"{limits.max_text_chars} characters of text in all",
        "properties": {
            "model": {"enum": [model_name], "description": "the served model (another one is a 404)"},
            "messages": {"type": "array", "minItems": 1, "maxItems": limits.max_messages, "items": messages,
                         "description": "the last one is a user message with text"},
            "max_tokens": {"type": ["integer", "null"], "minimum": 1},
            "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "top_p": {"type": ["number", "null"], "minimum": 1e-6, "maximum": 1},
            "top_k": {"type": ["integer", "null"], "minimum": -1, "description": "-1 or 0: off (vLLM's extension)"},
            "seed": {"type": ["integer", "null"], "minimum": -2**63, "maximum": 2**64 - 1},
            "stop": {"oneOf": [{"type": "null"}, {"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars},
                               {"type": "array", "minItems": 1, "maxItems": limits.max_stop,
                                "items": {"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars}}]},
            "n": {"enum": [1, None]},
            "stream": {"type": ["boolean", "null"]},
            "stream_options": {"type": ["object", "null"], "additionalProperties": False,
                               "properties": {"include_usage": {"type": "boolean"}}},
            "user": {"type": ["string", "null"], "maxLength": limits.max_user_chars},
            "media_io_kwargs": {"type": ["object", "null"], "additionalProperties": False,
                                "properties": {"video": sampling},
                                "description": "vLLM's: the frames to read of each video (num_frames or fps)"},
            "mm_processor_kwargs": {**sampling, "description": "vLLM's: num_frames or fps, as media_io_kwargs.video"},
            **neutral,
        },
    }


def openapi_spec(limits: RequestLimits, max_videos: int, model_name: str, *, api_key: bool = False) -> dict:
    json_body = {"application/json": {"schema": {"type": "object"}}}
    security = [{"bearer": []}] if api_key else []
    ops = {
        "/v1/chat/completions": {"post": {
            "operationId": "chat_completions", "security": security,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": chat_request_schema(limits, max_videos, model_name)}}},
            "responses": {"200": {"description": "chat.completion, or an SSE stream of chunks",
                                  "content": {**json_body, "text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(400, 401, 404, 408, 413, 415, 429, 500)}}},
        "/v1/video/frames": {"post": {
            "operationId": "video_frames", "security": security,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}}}},
            "responses": {"200": {"description": "the frames the model reads", "content": json_body},
                          **_errors(400, 401, 408, 413, 415)}}},
        "/v1/models": {"get": {"operationId": "models", "security": security,
                               "responses": {"200": {"description": "the served model", "content": json_body},
                                             **_errors(401)}}},
        "/v1/media": {"get": {"operationId": "media", "security": security,
                              "responses": {"200": {"description": "videos a file:// URL may name",
                                                    "content": json_body}, **_errors(401)}}},
        "/v1/videos/{job_id}": {"get": {
            "operationId": "video_job", "security": security,
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "a video job", "content": json_body}, **_errors(401, 404)}}},
        "/v1/videos/{job_id}/content": {"get": {
            "operationId": "video_content", "security": security,
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the mp4", "content": {"video/mp4": {}}}, **_errors(401, 404)}}},
        "/health": {"get": {"operationId": "health", "responses": {
            "200": {"description": "serving", "content": json_body},
            "503": {"description": "the engine stopped", "content": json_body}}}},
        "/metrics": {"get": {"operationId": "metrics", "responses": {"200": {"description": "Prometheus text"}}}},
    }
    spec = {"openapi": "3.1.0", "info": {"title": "g4v_jax", "version": "1"}, "paths": ops}
    if api_key:
        spec["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    return spec
