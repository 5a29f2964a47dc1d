"""Kubernetes LabelSelector, for nodes (`spec.nodeSelector`) and pods (OOM rules)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel

__all__ = ["LabelKey", "LabelSelector", "LabelSelectorRequirement", "LabelValue"]

_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _check_label_key(key: str) -> str:
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise ValueError(f"invalid label key {key!r}: the prefix must be a DNS subdomain")
    if not (len(name) <= 63 and _NAME.fullmatch(name)):
        raise ValueError(
            f"invalid label key {key!r}: the name must be 1-63 letters, digits, '-', '_' "
            "or '.', starting and ending with a letter or digit"
        )
    return key


def _check_label_value(value: str) -> str:
    if value and not (len(value) <= 63 and _NAME.fullmatch(value)):
        raise ValueError(
            f"invalid label value {value!r}: must be empty or 1-63 letters, digits, '-', '_' "
            "or '.', starting and ending with a letter or digit"
        )
    return value


LabelKey = Annotated[str, AfterValidator(_check_label_key)]
LabelValue = Annotated[str, AfterValidator(_check_label_value)]

_CONFIG = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    extra="forbid",
    strict=True,
    frozen=True,
)


class LabelSelectorRequirement(BaseModel):
    """One expression of a label selector: a key, an operator and values."""

    model_config = _CONFIG

    key: LabelKey = Field(description="The label key the expression applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In and NotIn compare the label's value with `values`; "
        "Exists and DoesNotExist test only whether the key is present."
    )
    values: list[LabelValue] = Field(
        default_factory=list,
        validate_default=True,
        description="Values for In and NotIn (at least one); must be empty for Exists "
        "and DoesNotExist.",
    )

    @field_validator("values")
    @classmethod
    def _values_fit_operator(cls, values: list[str], info: ValidationInfo) -> list[str]:
        operator = info.data.get("operator")
        if operator in ("In", "NotIn") and not values:
            raise ValueError(f"operator {operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise ValueError(f"operator {operator} takes no values")
        return values

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present


class LabelSelector(BaseModel):
    """A Kubernetes label selector; every part must match, and an empty one matches all."""

    model_config = _CONFIG

    match_labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        description="Labels that must be present with exactly these values.",
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list,
        max_length=32,  # bounds the CEL cost of the CRD's rule on each expression
        description="Expressions that must all hold.",
    )

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether `labels` satisfy this selector, with Kubernetes' semantics."""
        return all(labels.get(key) == value for key, value in self.match_labels.items()) and all(
            requirement.matches(labels) for requirement in self.match_expressions
        )
