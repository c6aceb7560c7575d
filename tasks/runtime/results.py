"""Result storage for cached tasks that reads back only typed JSON, never a pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from prefect.filesystems import LocalFileSystem
from pydantic import BaseModel, TypeAdapter


class CheckedResults(LocalFileSystem):
    """Result storage for a cached task whose results are JSON of one type (``result_model``: a pydantic
    model, or a plain type such as ``dict[str, float]``).

    Prefect decodes a persisted result with the serializer its file names, so a planted record saying
    ``pickle`` (or a JSON serializer with another decoder) would run code when the task's cache is
    checked. Reading through this storage refuses any record that is not plain JSON of exactly the
    expected model (a refused record is a cache miss: the task runs and overwrites it) and hands
    Prefect a record rebuilt from the validated value, with Prefect's default JSON serializer.
    """

    _block_type_name = "mmem checked results"
    result_model: ClassVar[Any]

    async def aread_path(self, path: str) -> bytes:
        return self.checked(await super().aread_path(path))

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # Prefect passes _sync
        return self.checked(LocalFileSystem.read_path(self, path, _sync=True))

    @classmethod
    def checked(cls, content: bytes) -> bytes:
        from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
        from prefect.serializers import JSONSerializer
        from prefect.utilities.importtools import to_qualified_name

        try:
            record = json.loads(content)
            meta = ResultRecordMetadata.model_validate(record["metadata"])
            serializer = record["metadata"]["serializer"]
            if serializer != JSONSerializer().model_dump(mode="json"):
                raise ValueError(
                    f"serializer {serializer.get('type') if isinstance(serializer, dict) else '?'}"
                )
            if not isinstance(record["result"], str):  # a JSON result is stored as its text
                raise TypeError("the result is not JSON text")
            payload = json.loads(record["result"])
            model = cls.result_model
            if isinstance(model, type) and issubclass(model, BaseModel):  # Prefect wraps a model in its name
                if not isinstance(payload, dict) or set(payload) != {"__class__", "data"} or \
                        payload["__class__"] != to_qualified_name(model):
                    raise ValueError("not a result of the expected type")
                _no_type_tags(payload["data"])
                value = model.model_validate(payload["data"])
            else:
                _no_type_tags(payload)
                value = TypeAdapter(model).validate_python(payload, strict=True)
        except Exception as exc:  # noqa: BLE001 - every way a record can be bad is a cache miss
            raise ValueError(f"refused a persisted result that is not JSON of {cls.result_model} "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
        clean = ResultRecordMetadata(serializer=JSONSerializer(), storage_key=meta.storage_key,
                                     expiration=meta.expiration, storage_block_id=meta.storage_block_id)
        return ResultRecord(metadata=clean, result=value).serialize()


def _no_type_tags(value: Any) -> None:
    """Prefect's JSON decoder imports whatever a ``__class__``/``__exc_type__`` key names: none inside."""
    if isinstance(value, dict):
        if "__class__" in value or "__exc_type__" in value:
            raise ValueError("a nested type tag")
        for v in value.values():
            _no_type_tags(v)
    elif isinstance(value, list):
        for v in value:
            _no_type_tags(v)


def checked_storage(cls: type[CheckedResults], folder: Path, prefix: str) -> CheckedResults:
    """``cls`` over ``folder``, saved server-side under a name derived from the path (Prefect wants
    result storage it can name), so results of one data root never answer for another."""
    path = folder.resolve()
    block = cls(basepath=str(path))
    block.save(f"{prefix}-{hashlib.sha256(str(path).encode()).hexdigest()[:16]}", overwrite=True)
    return block
