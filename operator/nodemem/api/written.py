"""Values kept as the user wrote them: parsed for use, serialised back unchanged."""

from __future__ import annotations

from typing import Any, Self

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema


class WrittenValue:
    """Base of Quantity, Percent, SizeOrPercent, Duration and Regex: subclasses define
    `parse(value)` (raising ValueError with the reason) and a `text` attribute, which is
    what a manifest, the CRD and a saved policy show."""

    text: Any

    @classmethod
    def parse(cls, value: object) -> Self:
        raise NotImplementedError

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.text),
        )
