import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CardStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CARD_STATUS_UNSPECIFIED: _ClassVar[CardStatus]
    CARD_STATUS_ACTIVE: _ClassVar[CardStatus]
    CARD_STATUS_BLOCKED: _ClassVar[CardStatus]
    CARD_STATUS_LOST: _ClassVar[CardStatus]
    CARD_STATUS_STOLEN: _ClassVar[CardStatus]
    CARD_STATUS_CLOSED: _ClassVar[CardStatus]

class AccountStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_STATUS_UNSPECIFIED: _ClassVar[AccountStatus]
    ACCOUNT_STATUS_OPEN: _ClassVar[AccountStatus]
    ACCOUNT_STATUS_FROZEN: _ClassVar[AccountStatus]
    ACCOUNT_STATUS_DORMANT: _ClassVar[AccountStatus]
    ACCOUNT_STATUS_CLOSED: _ClassVar[AccountStatus]

class AccountType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_TYPE_UNSPECIFIED: _ClassVar[AccountType]
    ACCOUNT_TYPE_CHECKING: _ClassVar[AccountType]
    ACCOUNT_TYPE_SAVINGS: _ClassVar[AccountType]
    ACCOUNT_TYPE_CREDIT: _ClassVar[AccountType]
    ACCOUNT_TYPE_PREPAID: _ClassVar[AccountType]

class CustomerStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CUSTOMER_STATUS_UNSPECIFIED: _ClassVar[CustomerStatus]
    CUSTOMER_STATUS_ACTIVE: _ClassVar[CustomerStatus]
    CUSTOMER_STATUS_SUSPENDED: _ClassVar[CustomerStatus]
    CUSTOMER_STATUS_DECEASED: _ClassVar[CustomerStatus]
    CUSTOMER_STATUS_CLOSED: _ClassVar[CustomerStatus]

class KycStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KYC_STATUS_UNSPECIFIED: _ClassVar[KycStatus]
    KYC_STATUS_PENDING: _ClassVar[KycStatus]
    KYC_STATUS_VERIFIED: _ClassVar[KycStatus]
    KYC_STATUS_FAILED: _ClassVar[KycStatus]

class RelationshipRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELATIONSHIP_ROLE_UNSPECIFIED: _ClassVar[RelationshipRole]
    RELATIONSHIP_ROLE_OWNER: _ClassVar[RelationshipRole]
    RELATIONSHIP_ROLE_JOINT: _ClassVar[RelationshipRole]
    RELATIONSHIP_ROLE_AUTHORIZED_SIGNER: _ClassVar[RelationshipRole]

class EntityType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTITY_TYPE_UNSPECIFIED: _ClassVar[EntityType]
    ENTITY_TYPE_CUSTOMER: _ClassVar[EntityType]
    ENTITY_TYPE_ACCOUNT: _ClassVar[EntityType]
    ENTITY_TYPE_CARD: _ClassVar[EntityType]
    ENTITY_TYPE_RELATIONSHIP: _ClassVar[EntityType]
    ENTITY_TYPE_MERGE: _ClassVar[EntityType]

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    OPERATION_CREATE: _ClassVar[Operation]
    OPERATION_UPDATE: _ClassVar[Operation]
    OPERATION_DELETE: _ClassVar[Operation]

class MatchDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MATCH_DECISION_UNSPECIFIED: _ClassVar[MatchDecision]
    MATCH_DECISION_MATCH: _ClassVar[MatchDecision]
    MATCH_DECISION_POSSIBLE_MATCH: _ClassVar[MatchDecision]
    MATCH_DECISION_NEW: _ClassVar[MatchDecision]

class ReviewStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_STATUS_UNSPECIFIED: _ClassVar[ReviewStatus]
    REVIEW_STATUS_OPEN: _ClassVar[ReviewStatus]
    REVIEW_STATUS_ACCEPTED: _ClassVar[ReviewStatus]
    REVIEW_STATUS_REJECTED: _ClassVar[ReviewStatus]
CARD_STATUS_UNSPECIFIED: CardStatus
CARD_STATUS_ACTIVE: CardStatus
CARD_STATUS_BLOCKED: CardStatus
CARD_STATUS_LOST: CardStatus
CARD_STATUS_STOLEN: CardStatus
CARD_STATUS_CLOSED: CardStatus
ACCOUNT_STATUS_UNSPECIFIED: AccountStatus
ACCOUNT_STATUS_OPEN: AccountStatus
ACCOUNT_STATUS_FROZEN: AccountStatus
ACCOUNT_STATUS_DORMANT: AccountStatus
ACCOUNT_STATUS_CLOSED: AccountStatus
ACCOUNT_TYPE_UNSPECIFIED: AccountType
ACCOUNT_TYPE_CHECKING: AccountType
ACCOUNT_TYPE_SAVINGS: AccountType
ACCOUNT_TYPE_CREDIT: AccountType
ACCOUNT_TYPE_PREPAID: AccountType
CUSTOMER_STATUS_UNSPECIFIED: CustomerStatus
CUSTOMER_STATUS_ACTIVE: CustomerStatus
CUSTOMER_STATUS_SUSPENDED: CustomerStatus
CUSTOMER_STATUS_DECEASED: CustomerStatus
CUSTOMER_STATUS_CLOSED: CustomerStatus
KYC_STATUS_UNSPECIFIED: KycStatus
KYC_STATUS_PENDING: KycStatus
KYC_STATUS_VERIFIED: KycStatus
KYC_STATUS_FAILED: KycStatus
RELATIONSHIP_ROLE_UNSPECIFIED: RelationshipRole
RELATIONSHIP_ROLE_OWNER: RelationshipRole
RELATIONSHIP_ROLE_JOINT: RelationshipRole
RELATIONSHIP_ROLE_AUTHORIZED_SIGNER: RelationshipRole
ENTITY_TYPE_UNSPECIFIED: EntityType
ENTITY_TYPE_CUSTOMER: EntityType
ENTITY_TYPE_ACCOUNT: EntityType
ENTITY_TYPE_CARD: EntityType
ENTITY_TYPE_RELATIONSHIP: EntityType
ENTITY_TYPE_MERGE: EntityType
OPERATION_UNSPECIFIED: Operation
OPERATION_CREATE: Operation
OPERATION_UPDATE: Operation
OPERATION_DELETE: Operation
MATCH_DECISION_UNSPECIFIED: MatchDecision
MATCH_DECISION_MATCH: MatchDecision
MATCH_DECISION_POSSIBLE_MATCH: MatchDecision
MATCH_DECISION_NEW: MatchDecision
REVIEW_STATUS_UNSPECIFIED: ReviewStatus
REVIEW_STATUS_OPEN: ReviewStatus
REVIEW_STATUS_ACCEPTED: ReviewStatus
REVIEW_STATUS_REJECTED: ReviewStatus

class Card(_message.Message):
    __slots__ = ("token", "masked_pan", "bin", "last4", "status", "expiry", "account_id", "version")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MASKED_PAN_FIELD_NUMBER: _ClassVar[int]
    BIN_FIELD_NUMBER: _ClassVar[int]
    LAST4_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    token: str
    masked_pan: str
    bin: str
    last4: str
    status: CardStatus
    expiry: str
    account_id: str
    version: int
    def __init__(self, token: _Optional[str] = ..., masked_pan: _Optional[str] = ..., bin: _Optional[str] = ..., last4: _Optional[str] = ..., status: _Optional[_Union[CardStatus, str]] = ..., expiry: _Optional[str] = ..., account_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Account(_message.Message):
    __slots__ = ("account_id", "routing_number", "masked_account_number", "last4", "type", "currency", "status", "version")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTING_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MASKED_ACCOUNT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LAST4_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    routing_number: str
    masked_account_number: str
    last4: str
    type: AccountType
    currency: str
    status: AccountStatus
    version: int
    def __init__(self, account_id: _Optional[str] = ..., routing_number: _Optional[str] = ..., masked_account_number: _Optional[str] = ..., last4: _Optional[str] = ..., type: _Optional[_Union[AccountType, str]] = ..., currency: _Optional[str] = ..., status: _Optional[_Union[AccountStatus, str]] = ..., version: _Optional[int] = ...) -> None: ...

class Customer(_message.Message):
    __slots__ = ("customer_id", "display_name", "segment", "status", "kyc_status", "version", "merged_into")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    KYC_STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MERGED_INTO_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    display_name: str
    segment: str
    status: CustomerStatus
    kyc_status: KycStatus
    version: int
    merged_into: str
    def __init__(self, customer_id: _Optional[str] = ..., display_name: _Optional[str] = ..., segment: _Optional[str] = ..., status: _Optional[_Union[CustomerStatus, str]] = ..., kyc_status: _Optional[_Union[KycStatus, str]] = ..., version: _Optional[int] = ..., merged_into: _Optional[str] = ...) -> None: ...

class RelatedCustomer(_message.Message):
    __slots__ = ("customer", "role")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    customer: Customer
    role: RelationshipRole
    def __init__(self, customer: _Optional[_Union[Customer, _Mapping]] = ..., role: _Optional[_Union[RelationshipRole, str]] = ...) -> None: ...

class Resolution(_message.Message):
    __slots__ = ("card", "account", "customer", "related_customers", "in_good_standing", "decision")
    CARD_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    RELATED_CUSTOMERS_FIELD_NUMBER: _ClassVar[int]
    IN_GOOD_STANDING_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    card: Card
    account: Account
    customer: Customer
    related_customers: _containers.RepeatedCompositeFieldContainer[RelatedCustomer]
    in_good_standing: bool
    decision: DecisionHint
    def __init__(self, card: _Optional[_Union[Card, _Mapping]] = ..., account: _Optional[_Union[Account, _Mapping]] = ..., customer: _Optional[_Union[Customer, _Mapping]] = ..., related_customers: _Optional[_Iterable[_Union[RelatedCustomer, _Mapping]]] = ..., in_good_standing: _Optional[bool] = ..., decision: _Optional[_Union[DecisionHint, _Mapping]] = ...) -> None: ...

class DecisionHint(_message.Message):
    __slots__ = ("iso8583_response_code", "nacha_return_code", "reason", "table_version")
    ISO8583_RESPONSE_CODE_FIELD_NUMBER: _ClassVar[int]
    NACHA_RETURN_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    iso8583_response_code: str
    nacha_return_code: str
    reason: str
    table_version: str
    def __init__(self, iso8583_response_code: _Optional[str] = ..., nacha_return_code: _Optional[str] = ..., reason: _Optional[str] = ..., table_version: _Optional[str] = ...) -> None: ...

class CustomerAccount(_message.Message):
    __slots__ = ("account", "role")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    account: Account
    role: RelationshipRole
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., role: _Optional[_Union[RelationshipRole, str]] = ...) -> None: ...

class CustomerProfile(_message.Message):
    __slots__ = ("customer", "accounts", "cards", "merged_from")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FROM_FIELD_NUMBER: _ClassVar[int]
    customer: Customer
    accounts: _containers.RepeatedCompositeFieldContainer[CustomerAccount]
    cards: _containers.RepeatedCompositeFieldContainer[Card]
    merged_from: str
    def __init__(self, customer: _Optional[_Union[Customer, _Mapping]] = ..., accounts: _Optional[_Iterable[_Union[CustomerAccount, _Mapping]]] = ..., cards: _Optional[_Iterable[_Union[Card, _Mapping]]] = ..., merged_from: _Optional[str] = ...) -> None: ...

class ResolveCardRequest(_message.Message):
    __slots__ = ("pan", "token")
    PAN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    pan: str
    token: str
    def __init__(self, pan: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class AccountKey(_message.Message):
    __slots__ = ("routing_number", "account_number")
    ROUTING_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    routing_number: str
    account_number: str
    def __init__(self, routing_number: _Optional[str] = ..., account_number: _Optional[str] = ...) -> None: ...

class ResolveAccountRequest(_message.Message):
    __slots__ = ("routing_number", "account_number")
    ROUTING_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    routing_number: str
    account_number: str
    def __init__(self, routing_number: _Optional[str] = ..., account_number: _Optional[str] = ...) -> None: ...

class GetCustomerRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class LookupKey(_message.Message):
    __slots__ = ("pan", "card_token", "account", "customer_id", "correlation_id")
    PAN_FIELD_NUMBER: _ClassVar[int]
    CARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    pan: str
    card_token: str
    account: AccountKey
    customer_id: str
    correlation_id: str
    def __init__(self, pan: _Optional[str] = ..., card_token: _Optional[str] = ..., account: _Optional[_Union[AccountKey, _Mapping]] = ..., customer_id: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class LookupResult(_message.Message):
    __slots__ = ("correlation_id", "code", "message", "resolution", "customer", "bin_range", "decision")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    BIN_RANGE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    code: int
    message: str
    resolution: Resolution
    customer: CustomerProfile
    bin_range: BinRange
    decision: DecisionHint
    def __init__(self, correlation_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., resolution: _Optional[_Union[Resolution, _Mapping]] = ..., customer: _Optional[_Union[CustomerProfile, _Mapping]] = ..., bin_range: _Optional[_Union[BinRange, _Mapping]] = ..., decision: _Optional[_Union[DecisionHint, _Mapping]] = ...) -> None: ...

class BinRange(_message.Message):
    __slots__ = ("low", "high", "pan_length", "network", "issuer_name", "issuer_country", "product", "on_us", "table_version")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    PAN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    ISSUER_NAME_FIELD_NUMBER: _ClassVar[int]
    ISSUER_COUNTRY_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    ON_US_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    low: str
    high: str
    pan_length: int
    network: str
    issuer_name: str
    issuer_country: str
    product: str
    on_us: bool
    table_version: int
    def __init__(self, low: _Optional[str] = ..., high: _Optional[str] = ..., pan_length: _Optional[int] = ..., network: _Optional[str] = ..., issuer_name: _Optional[str] = ..., issuer_country: _Optional[str] = ..., product: _Optional[str] = ..., on_us: _Optional[bool] = ..., table_version: _Optional[int] = ...) -> None: ...

class ResolveBinRequest(_message.Message):
    __slots__ = ("pan", "prefix")
    PAN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    pan: str
    prefix: str
    def __init__(self, pan: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class BatchResolveRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[LookupKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[LookupKey, _Mapping]]] = ...) -> None: ...

class BatchResolveResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LookupResult]
    def __init__(self, results: _Optional[_Iterable[_Union[LookupResult, _Mapping]]] = ...) -> None: ...

class CreateCustomerRequest(_message.Message):
    __slots__ = ("request_id", "display_name", "segment", "kyc_status", "identity", "source_ref", "force_new")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    KYC_STATUS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REF_FIELD_NUMBER: _ClassVar[int]
    FORCE_NEW_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    display_name: str
    segment: str
    kyc_status: KycStatus
    identity: IdentityAttributes
    source_ref: SourceRef
    force_new: bool
    def __init__(self, request_id: _Optional[str] = ..., display_name: _Optional[str] = ..., segment: _Optional[str] = ..., kyc_status: _Optional[_Union[KycStatus, str]] = ..., identity: _Optional[_Union[IdentityAttributes, _Mapping]] = ..., source_ref: _Optional[_Union[SourceRef, _Mapping]] = ..., force_new: _Optional[bool] = ...) -> None: ...

class UpdateCustomerRequest(_message.Message):
    __slots__ = ("request_id", "customer_id", "expected_version", "display_name", "segment", "kyc_status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    KYC_STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    customer_id: str
    expected_version: int
    display_name: str
    segment: str
    kyc_status: KycStatus
    def __init__(self, request_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., display_name: _Optional[str] = ..., segment: _Optional[str] = ..., kyc_status: _Optional[_Union[KycStatus, str]] = ...) -> None: ...

class SetCustomerStatusRequest(_message.Message):
    __slots__ = ("request_id", "customer_id", "expected_version", "status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    customer_id: str
    expected_version: int
    status: CustomerStatus
    def __init__(self, request_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., status: _Optional[_Union[CustomerStatus, str]] = ...) -> None: ...

class CreateAccountRequest(_message.Message):
    __slots__ = ("request_id", "routing_number", "account_number", "type", "currency", "owner_customer_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTING_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    OWNER_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    routing_number: str
    account_number: str
    type: AccountType
    currency: str
    owner_customer_id: str
    def __init__(self, request_id: _Optional[str] = ..., routing_number: _Optional[str] = ..., account_number: _Optional[str] = ..., type: _Optional[_Union[AccountType, str]] = ..., currency: _Optional[str] = ..., owner_customer_id: _Optional[str] = ...) -> None: ...

class SetAccountStatusRequest(_message.Message):
    __slots__ = ("request_id", "account_id", "expected_version", "status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    account_id: str
    expected_version: int
    status: AccountStatus
    def __init__(self, request_id: _Optional[str] = ..., account_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., status: _Optional[_Union[AccountStatus, str]] = ...) -> None: ...

class CloseAccountRequest(_message.Message):
    __slots__ = ("request_id", "account_id", "expected_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    account_id: str
    expected_version: int
    def __init__(self, request_id: _Optional[str] = ..., account_id: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class LinkCustomerRequest(_message.Message):
    __slots__ = ("request_id", "account_id", "customer_id", "role")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    account_id: str
    customer_id: str
    role: RelationshipRole
    def __init__(self, request_id: _Optional[str] = ..., account_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., role: _Optional[_Union[RelationshipRole, str]] = ...) -> None: ...

class UnlinkCustomerRequest(_message.Message):
    __slots__ = ("request_id", "account_id", "customer_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    account_id: str
    customer_id: str
    def __init__(self, request_id: _Optional[str] = ..., account_id: _Optional[str] = ..., customer_id: _Optional[str] = ...) -> None: ...

class IssueCardRequest(_message.Message):
    __slots__ = ("request_id", "pan", "expiry", "account_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAN_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pan: str
    expiry: str
    account_id: str
    def __init__(self, request_id: _Optional[str] = ..., pan: _Optional[str] = ..., expiry: _Optional[str] = ..., account_id: _Optional[str] = ...) -> None: ...

class LinkCardRequest(_message.Message):
    __slots__ = ("request_id", "card_token", "account_id", "expected_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_token: str
    account_id: str
    expected_version: int
    def __init__(self, request_id: _Optional[str] = ..., card_token: _Optional[str] = ..., account_id: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class SetCardStatusRequest(_message.Message):
    __slots__ = ("request_id", "card_token", "expected_version", "status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_token: str
    expected_version: int
    status: CardStatus
    def __init__(self, request_id: _Optional[str] = ..., card_token: _Optional[str] = ..., expected_version: _Optional[int] = ..., status: _Optional[_Union[CardStatus, str]] = ...) -> None: ...

class RelationshipResponse(_message.Message):
    __slots__ = ("account_id", "customer_id", "role")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    customer_id: str
    role: RelationshipRole
    def __init__(self, account_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., role: _Optional[_Union[RelationshipRole, str]] = ...) -> None: ...

class Relationship(_message.Message):
    __slots__ = ("account_id", "customer_id", "role")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    customer_id: str
    role: RelationshipRole
    def __init__(self, account_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., role: _Optional[_Union[RelationshipRole, str]] = ...) -> None: ...

class Merge(_message.Message):
    __slots__ = ("winner_customer_id", "loser_customer_id", "unmerge", "skipped_account_ids")
    WINNER_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LOSER_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    UNMERGE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_ACCOUNT_IDS_FIELD_NUMBER: _ClassVar[int]
    winner_customer_id: str
    loser_customer_id: str
    unmerge: bool
    skipped_account_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, winner_customer_id: _Optional[str] = ..., loser_customer_id: _Optional[str] = ..., unmerge: _Optional[bool] = ..., skipped_account_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("high_water_sequence",)
    HIGH_WATER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    high_water_sequence: int
    def __init__(self, high_water_sequence: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("from_sequence", "entity_types", "epoch")
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_TYPES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    from_sequence: int
    entity_types: _containers.RepeatedScalarFieldContainer[EntityType]
    epoch: str
    def __init__(self, from_sequence: _Optional[int] = ..., entity_types: _Optional[_Iterable[_Union[EntityType, str]]] = ..., epoch: _Optional[str] = ...) -> None: ...

class ChangeEvent(_message.Message):
    __slots__ = ("sequence", "committed_at", "entity_type", "entity_id", "op", "version", "customer", "account", "card", "relationship", "merge", "progress", "epoch")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENTITY_TYPE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    RELATIONSHIP_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    committed_at: _timestamp_pb2.Timestamp
    entity_type: EntityType
    entity_id: str
    op: Operation
    version: int
    customer: Customer
    account: Account
    card: Card
    relationship: Relationship
    merge: Merge
    progress: Progress
    epoch: str
    def __init__(self, sequence: _Optional[int] = ..., committed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., entity_type: _Optional[_Union[EntityType, str]] = ..., entity_id: _Optional[str] = ..., op: _Optional[_Union[Operation, str]] = ..., version: _Optional[int] = ..., customer: _Optional[_Union[Customer, _Mapping]] = ..., account: _Optional[_Union[Account, _Mapping]] = ..., card: _Optional[_Union[Card, _Mapping]] = ..., relationship: _Optional[_Union[Relationship, _Mapping]] = ..., merge: _Optional[_Union[Merge, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., epoch: _Optional[str] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("entity_types",)
    ENTITY_TYPES_FIELD_NUMBER: _ClassVar[int]
    entity_types: _containers.RepeatedScalarFieldContainer[EntityType]
    def __init__(self, entity_types: _Optional[_Iterable[_Union[EntityType, str]]] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("sequence", "customers", "accounts", "cards", "relationships", "last", "epoch")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CUSTOMERS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    RELATIONSHIPS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    customers: _containers.RepeatedCompositeFieldContainer[Customer]
    accounts: _containers.RepeatedCompositeFieldContainer[Account]
    cards: _containers.RepeatedCompositeFieldContainer[Card]
    relationships: _containers.RepeatedCompositeFieldContainer[Relationship]
    last: bool
    epoch: str
    def __init__(self, sequence: _Optional[int] = ..., customers: _Optional[_Iterable[_Union[Customer, _Mapping]]] = ..., accounts: _Optional[_Iterable[_Union[Account, _Mapping]]] = ..., cards: _Optional[_Iterable[_Union[Card, _Mapping]]] = ..., relationships: _Optional[_Iterable[_Union[Relationship, _Mapping]]] = ..., last: _Optional[bool] = ..., epoch: _Optional[str] = ...) -> None: ...

class SourceRef(_message.Message):
    __slots__ = ("system", "key")
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    system: str
    key: str
    def __init__(self, system: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class PostalAddress(_message.Message):
    __slots__ = ("line1", "line2", "locality", "postcode", "region", "country")
    LINE1_FIELD_NUMBER: _ClassVar[int]
    LINE2_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_FIELD_NUMBER: _ClassVar[int]
    POSTCODE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    line1: str
    line2: str
    locality: str
    postcode: str
    region: str
    country: str
    def __init__(self, line1: _Optional[str] = ..., line2: _Optional[str] = ..., locality: _Optional[str] = ..., postcode: _Optional[str] = ..., region: _Optional[str] = ..., country: _Optional[str] = ...) -> None: ...

class IdentityAttributes(_message.Message):
    __slots__ = ("given_name", "family_name", "date_of_birth", "national_id", "national_id_type", "address", "phone", "email", "national_id_last4")
    GIVEN_NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_NAME_FIELD_NUMBER: _ClassVar[int]
    DATE_OF_BIRTH_FIELD_NUMBER: _ClassVar[int]
    NATIONAL_ID_FIELD_NUMBER: _ClassVar[int]
    NATIONAL_ID_TYPE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PHONE_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    NATIONAL_ID_LAST4_FIELD_NUMBER: _ClassVar[int]
    given_name: str
    family_name: str
    date_of_birth: str
    national_id: str
    national_id_type: str
    address: PostalAddress
    phone: str
    email: str
    national_id_last4: str
    def __init__(self, given_name: _Optional[str] = ..., family_name: _Optional[str] = ..., date_of_birth: _Optional[str] = ..., national_id: _Optional[str] = ..., national_id_type: _Optional[str] = ..., address: _Optional[_Union[PostalAddress, _Mapping]] = ..., phone: _Optional[str] = ..., email: _Optional[str] = ..., national_id_last4: _Optional[str] = ...) -> None: ...

class AttributeEvidence(_message.Message):
    __slots__ = ("attribute", "level", "weight")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    level: str
    weight: float
    def __init__(self, attribute: _Optional[str] = ..., level: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class MatchCandidate(_message.Message):
    __slots__ = ("customer_id", "probability", "match_weight", "evidence", "rule")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MATCH_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    probability: float
    match_weight: float
    evidence: _containers.RepeatedCompositeFieldContainer[AttributeEvidence]
    rule: str
    def __init__(self, customer_id: _Optional[str] = ..., probability: _Optional[float] = ..., match_weight: _Optional[float] = ..., evidence: _Optional[_Iterable[_Union[AttributeEvidence, _Mapping]]] = ..., rule: _Optional[str] = ...) -> None: ...

class IdentifyCustomerRequest(_message.Message):
    __slots__ = ("attributes", "max_candidates")
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    attributes: IdentityAttributes
    max_candidates: int
    def __init__(self, attributes: _Optional[_Union[IdentityAttributes, _Mapping]] = ..., max_candidates: _Optional[int] = ...) -> None: ...

class IdentifyCustomerResponse(_message.Message):
    __slots__ = ("decision", "candidates", "model_version")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    decision: MatchDecision
    candidates: _containers.RepeatedCompositeFieldContainer[MatchCandidate]
    model_version: str
    def __init__(self, decision: _Optional[_Union[MatchDecision, str]] = ..., candidates: _Optional[_Iterable[_Union[MatchCandidate, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetCustomerIdentityRequest(_message.Message):
    __slots__ = ("customer_id", "source_ref")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REF_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    source_ref: SourceRef
    def __init__(self, customer_id: _Optional[str] = ..., source_ref: _Optional[_Union[SourceRef, _Mapping]] = ...) -> None: ...

class CustomerIdentity(_message.Message):
    __slots__ = ("customer_id", "attributes", "source_refs", "merged_ids", "merged_from")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REFS_FIELD_NUMBER: _ClassVar[int]
    MERGED_IDS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FROM_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    attributes: IdentityAttributes
    source_refs: _containers.RepeatedCompositeFieldContainer[SourceRef]
    merged_ids: _containers.RepeatedScalarFieldContainer[str]
    merged_from: str
    def __init__(self, customer_id: _Optional[str] = ..., attributes: _Optional[_Union[IdentityAttributes, _Mapping]] = ..., source_refs: _Optional[_Iterable[_Union[SourceRef, _Mapping]]] = ..., merged_ids: _Optional[_Iterable[str]] = ..., merged_from: _Optional[str] = ...) -> None: ...

class ResolveSourceRefResponse(_message.Message):
    __slots__ = ("customer_id", "merged_from")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    MERGED_FROM_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    merged_from: str
    def __init__(self, customer_id: _Optional[str] = ..., merged_from: _Optional[str] = ...) -> None: ...

class UpdateCustomerIdentityRequest(_message.Message):
    __slots__ = ("request_id", "customer_id", "source_ref", "attributes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REF_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    customer_id: str
    source_ref: SourceRef
    attributes: IdentityAttributes
    def __init__(self, request_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., source_ref: _Optional[_Union[SourceRef, _Mapping]] = ..., attributes: _Optional[_Union[IdentityAttributes, _Mapping]] = ...) -> None: ...

class MergeCustomersRequest(_message.Message):
    __slots__ = ("request_id", "survivor_id", "merged_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_ID_FIELD_NUMBER: _ClassVar[int]
    MERGED_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    survivor_id: str
    merged_id: str
    def __init__(self, request_id: _Optional[str] = ..., survivor_id: _Optional[str] = ..., merged_id: _Optional[str] = ...) -> None: ...

class UnmergeCustomerRequest(_message.Message):
    __slots__ = ("request_id", "merged_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MERGED_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    merged_id: str
    def __init__(self, request_id: _Optional[str] = ..., merged_id: _Optional[str] = ...) -> None: ...

class ReviewTask(_message.Message):
    __slots__ = ("review_id", "customer_id", "candidate_id", "probability", "evidence", "status", "created_at", "decided_at")
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    customer_id: str
    candidate_id: str
    probability: float
    evidence: _containers.RepeatedCompositeFieldContainer[AttributeEvidence]
    status: ReviewStatus
    created_at: _timestamp_pb2.Timestamp
    decided_at: _timestamp_pb2.Timestamp
    def __init__(self, review_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., candidate_id: _Optional[str] = ..., probability: _Optional[float] = ..., evidence: _Optional[_Iterable[_Union[AttributeEvidence, _Mapping]]] = ..., status: _Optional[_Union[ReviewStatus, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListReviewTasksRequest(_message.Message):
    __slots__ = ("status", "page_size", "page_token")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    status: ReviewStatus
    page_size: int
    page_token: str
    def __init__(self, status: _Optional[_Union[ReviewStatus, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReviewTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[ReviewTask]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[ReviewTask, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DecideReviewTaskRequest(_message.Message):
    __slots__ = ("request_id", "review_id", "accept")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    review_id: str
    accept: bool
    def __init__(self, request_id: _Optional[str] = ..., review_id: _Optional[str] = ..., accept: _Optional[bool] = ...) -> None: ...
