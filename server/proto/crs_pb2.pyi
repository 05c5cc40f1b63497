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
    __slots__ = ("customer_id", "display_name", "segment", "status", "kyc_status", "version")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    KYC_STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    display_name: str
    segment: str
    status: CustomerStatus
    kyc_status: KycStatus
    version: int
    def __init__(self, customer_id: _Optional[str] = ..., display_name: _Optional[str] = ..., segment: _Optional[str] = ..., status: _Optional[_Union[CustomerStatus, str]] = ..., kyc_status: _Optional[_Union[KycStatus, str]] = ..., version: _Optional[int] = ...) -> None: ...

class RelatedCustomer(_message.Message):
    __slots__ = ("customer", "role")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    customer: Customer
    role: RelationshipRole
    def __init__(self, customer: _Optional[_Union[Customer, _Mapping]] = ..., role: _Optional[_Union[RelationshipRole, str]] = ...) -> None: ...

class Resolution(_message.Message):
    __slots__ = ("card", "account", "customer", "related_customers", "in_good_standing")
    CARD_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    RELATED_CUSTOMERS_FIELD_NUMBER: _ClassVar[int]
    IN_GOOD_STANDING_FIELD_NUMBER: _ClassVar[int]
    card: Card
    account: Account
    customer: Customer
    related_customers: _containers.RepeatedCompositeFieldContainer[RelatedCustomer]
    in_good_standing: bool
    def __init__(self, card: _Optional[_Union[Card, _Mapping]] = ..., account: _Optional[_Union[Account, _Mapping]] = ..., customer: _Optional[_Union[Customer, _Mapping]] = ..., related_customers: _Optional[_Iterable[_Union[RelatedCustomer, _Mapping]]] = ..., in_good_standing: _Optional[bool] = ...) -> None: ...

class CustomerAccount(_message.Message):
    __slots__ = ("account", "role")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    account: Account
    role: RelationshipRole
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., role: _Optional[_Union[RelationshipRole, str]] = ...) -> None: ...

class CustomerProfile(_message.Message):
    __slots__ = ("customer", "accounts", "cards")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    customer: Customer
    accounts: _containers.RepeatedCompositeFieldContainer[CustomerAccount]
    cards: _containers.RepeatedCompositeFieldContainer[Card]
    def __init__(self, customer: _Optional[_Union[Customer, _Mapping]] = ..., accounts: _Optional[_Iterable[_Union[CustomerAccount, _Mapping]]] = ..., cards: _Optional[_Iterable[_Union[Card, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("correlation_id", "code", "message", "resolution", "customer")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    code: int
    message: str
    resolution: Resolution
    customer: CustomerProfile
    def __init__(self, correlation_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., resolution: _Optional[_Union[Resolution, _Mapping]] = ..., customer: _Optional[_Union[CustomerProfile, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("request_id", "display_name", "segment", "kyc_status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    KYC_STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    display_name: str
    segment: str
    kyc_status: KycStatus
    def __init__(self, request_id: _Optional[str] = ..., display_name: _Optional[str] = ..., segment: _Optional[str] = ..., kyc_status: _Optional[_Union[KycStatus, str]] = ...) -> None: ...

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
